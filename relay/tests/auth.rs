//! API keys, access tokens and refresh tokens against a real relay: the exchange, the
//! rotation, a reused refresh token revoking its family, scopes, and a bridge that ends
//! when its access token expires unless renewed in-band.

mod common;

use std::time::Duration;

use cloud_protocol::bridge::{BearerToken, FromRelay, ToRelay, BRIDGE_PATH};
use cloud_relay::access::Scope;
use cloud_relay::tokens::NewKey;
use common::{websocket, Bridge, TestRelay};
use serde_json::{json, Value};

async fn post_token(relay: &TestRelay, body: Value) -> (u16, Value) {
    relay
        .http("POST", "/v1/auth/token", None, Some(&body.to_string()))
        .await
}

async fn exchange(relay: &TestRelay, key: &str) -> (String, String) {
    let (code, answer) = post_token(relay, json!({"grant_type": "api_key", "api_key": key})).await;
    assert_eq!(code, 200, "{answer}");
    (
        answer["access_token"].as_str().unwrap().to_owned(),
        answer["refresh_token"].as_str().unwrap().to_owned(),
    )
}

async fn refresh(relay: &TestRelay, refresh_token: &str) -> (u16, Value) {
    post_token(
        relay,
        json!({"grant_type": "refresh_token", "refresh_token": refresh_token}),
    )
    .await
}

async fn list(relay: &TestRelay, token: &str) -> u16 {
    relay.http("GET", "/v1/sessions", Some(token), None).await.0
}

#[tokio::test]
async fn refresh_tokens_rotate_and_a_reused_one_revokes_its_whole_family() {
    let relay = TestRelay::start(common::shell_agent()).await;
    let key = relay.token("alice", "acme");
    let (code, answer) = post_token(&relay, json!({"grant_type": "api_key", "api_key": key})).await;
    assert_eq!(code, 200, "{answer}");
    assert_eq!(answer["token_type"], "Bearer");
    assert_eq!(answer["expires_in"], 900);
    assert_eq!(answer["user"], "alice");
    assert_eq!(answer["orgs"], json!(["acme"]));
    assert_eq!(answer["scopes"], json!(["sessions:read", "sessions:write"]));
    let access = answer["access_token"].as_str().unwrap().to_owned();
    let first = answer["refresh_token"].as_str().unwrap().to_owned();
    assert!(access.starts_with("cat_") && first.starts_with("crf_"));
    assert_eq!(list(&relay, &access).await, 200);

    // Rotation: each refresh token works once.
    let (code, answer) = refresh(&relay, &first).await;
    assert_eq!(code, 200, "{answer}");
    let second = answer["refresh_token"].as_str().unwrap().to_owned();
    let access2 = answer["access_token"].as_str().unwrap().to_owned();
    assert_ne!(second, first);
    assert_eq!(list(&relay, &access2).await, 200);

    // The first one again: the whole family goes, the latest token and the access tokens
    // issued with it included. The answer says what to do and quotes no token.
    let (code, answer) = refresh(&relay, &first).await;
    assert_eq!(code, 401);
    let message = answer["error"].as_str().unwrap();
    assert!(
        message.contains("already used") && message.contains("cloudctl login"),
        "{message}"
    );
    assert!(
        !message.contains("crf_") && !message.contains("cat_"),
        "{message}"
    );
    assert_eq!(refresh(&relay, &second).await.0, 401);
    assert_eq!(list(&relay, &access).await, 401);
    assert_eq!(list(&relay, &access2).await, 401);

    // The API key itself is untouched: a new login is a new family.
    let (access3, _) = exchange(&relay, &key).await;
    assert_eq!(list(&relay, &access3).await, 200);
    // Revoking the key ends its access tokens and its exchanges.
    cloud_relay::tokens::revoke_user(relay.data(), "alice").unwrap();
    assert_eq!(list(&relay, &access3).await, 401);
    assert_eq!(
        post_token(&relay, json!({"grant_type": "api_key", "api_key": key}))
            .await
            .0,
        401
    );
    relay.stop().await;
}

#[tokio::test]
async fn token_requests_that_do_not_parse_are_refused_without_quoting_them() {
    let relay = TestRelay::start(common::shell_agent()).await;
    for body in [
        json!({"grant_type": "crt_0123456789abcdef"}),
        json!({"grant_type": "api_key", "api_key": 5, "extra": "crt_0123456789abcdef"}),
        json!({"grant_type": "refresh_token"}),
    ] {
        let (code, answer) = post_token(&relay, body).await;
        assert_eq!(code, 400, "{answer}");
        assert!(!answer.to_string().contains("0123456789"), "{answer}");
    }
    let (code, answer) = refresh(&relay, "crf_0123456789abcdef").await;
    assert_eq!(code, 401);
    assert!(!answer.to_string().contains("0123456789"), "{answer}");
    // A forged access token (claims of an admin, signed by nobody).
    assert_eq!(list(&relay, "cat_7b7d.0000").await, 401);
    relay.stop().await;
}

#[tokio::test]
async fn scopes_limit_what_a_key_and_its_access_tokens_may_do() {
    let relay = TestRelay::start(common::shell_agent()).await;
    let mut read_only = NewKey::new("reader", "acme");
    read_only.scopes = vec![Scope::SessionsRead];
    let key = cloud_relay::tokens::create(relay.data(), &read_only).unwrap();
    let (access, _) = exchange(&relay, &key).await;
    for token in [&key, &access] {
        assert_eq!(list(&relay, token).await, 200);
        let (code, answer) = relay
            .http("POST", "/v1/sessions", Some(token), Some("{}"))
            .await;
        assert_eq!(code, 403, "{answer}");
        assert!(answer["error"].as_str().unwrap().contains("sessions:write"));
        assert_eq!(
            websocket(relay.addr, BRIDGE_PATH, token).await.err(),
            Some(403)
        );
    }
    relay.stop().await;
}

#[tokio::test]
async fn a_bridge_ends_when_its_access_token_expires_unless_it_renews_it() {
    let ttl = Duration::from_secs(1);
    let relay = TestRelay::start_with_ttl(common::shell_agent(), ttl).await;
    let key = relay.token("alice", "acme");

    // Not renewed: refused (not for good) once the token expires.
    let (access, refresh_token) = exchange(&relay, &key).await;
    let (mut bridge, _) = Bridge::connect(relay.addr, &access, "i-1").await;
    let reason = bridge
        .recv_until("the expiry", |m| match m {
            FromRelay::Refused { reason, permanent } => Some((reason.clone(), *permanent)),
            _ => None,
        })
        .await;
    assert!(reason.0.contains("expired") && !reason.1, "{reason:?}");

    // Renewed every 500 ms: still up after three lifetimes, as a session created then
    // shows.
    let (code, answer) = refresh(&relay, &refresh_token).await;
    assert_eq!(code, 200, "{answer}");
    let mut refresh_token = answer["refresh_token"].as_str().unwrap().to_owned();
    let access = answer["access_token"].as_str().unwrap().to_owned();
    let (mut bridge, _) = Bridge::connect(relay.addr, &access, "i-1").await;
    for _ in 0..6 {
        tokio::time::sleep(ttl / 2).await;
        let (code, answer) = refresh(&relay, &refresh_token).await;
        assert_eq!(code, 200, "{answer}");
        refresh_token = answer["refresh_token"].as_str().unwrap().to_owned();
        let token = BearerToken(answer["access_token"].as_str().unwrap().to_owned());
        bridge.send(0, ToRelay::Authenticate { token }).await;
    }
    let created = relay.create(&key, r#"{"task": "still here"}"#).await;
    let id = created["id"].as_str().unwrap().to_owned();
    bridge
        .recv_until("the new session", |m| match m {
            FromRelay::SessionChanged(session) if session.id == id => Some(()),
            FromRelay::Refused { reason, .. } => panic!("refused: {reason}"),
            _ => None,
        })
        .await;

    // Another user's token cannot renew it.
    let other = relay.token("bob", "acme");
    let (bobs, _) = exchange(&relay, &other).await;
    bridge
        .send(
            0,
            ToRelay::Authenticate {
                token: BearerToken(bobs),
            },
        )
        .await;
    let refusal = bridge
        .recv_until("a refusal", |m| match m {
            FromRelay::Refused { reason, permanent } => Some((reason.clone(), *permanent)),
            _ => None,
        })
        .await;
    assert!(
        refusal.0.contains("another login") && !refusal.1,
        "{refusal:?}"
    );
    relay.stop().await;
}

#[tokio::test]
async fn a_revoked_family_ends_its_bridge_for_good() {
    let relay = TestRelay::start(common::shell_agent()).await;
    let key = relay.token("alice", "acme");
    let (access, first) = exchange(&relay, &key).await;
    let (mut bridge, _) = Bridge::connect(relay.addr, &access, "i-1").await;
    assert_eq!(refresh(&relay, &first).await.0, 200);
    assert_eq!(refresh(&relay, &first).await.0, 401);
    let refusal = bridge
        .recv_until("a refusal", |m| match m {
            FromRelay::Refused { reason, permanent } => Some((reason.clone(), *permanent)),
            _ => None,
        })
        .await;
    assert!(
        refusal.1 && refusal.0.contains("cloudctl login"),
        "{refusal:?}"
    );
    relay.stop().await;
}

/// The device grant's HTTP surface: the start's answer, a poll sooner than the interval
/// answered `slow_down` and one still waiting `authorization_pending` (RFC 8628's shape,
/// never quoting the code), approval only with a bearer, a second decision 409, an
/// unknown code 404; and the user's logins listed (named) and revoked, another user's
/// not revocable.
#[tokio::test]
async fn device_logins_and_the_users_logins_over_http() {
    let relay = TestRelay::start(common::shell_agent()).await;
    let (code, started) = relay
        .http(
            "POST",
            "/v1/auth/device",
            None,
            Some(r#"{"name": "laptop"}"#),
        )
        .await;
    assert_eq!(code, 200, "{started}");
    assert_eq!(started["interval"], 5);
    assert_eq!(started["expires_in"], 600);
    let device_code = started["device_code"].as_str().unwrap().to_owned();
    let user_code = started["user_code"].as_str().unwrap().to_owned();
    assert!(
        device_code.starts_with("cdc_") && user_code.len() == 9,
        "{started}"
    );

    let poll = json!({"grant_type": "device_code", "device_code": device_code});
    let (code, answer) = post_token(&relay, poll.clone()).await;
    assert_eq!((code, answer["error"].as_str()), (400, Some("slow_down")));
    assert!(!answer.to_string().contains("cdc_"), "{answer}");

    let decide = |path: &'static str, token: Option<String>, code: String| {
        let relay = &relay;
        async move {
            relay
                .http(
                    "POST",
                    path,
                    token.as_deref(),
                    Some(&json!({"user_code": code}).to_string()),
                )
                .await
        }
    };
    let approve = "/v1/auth/device/approve";
    assert_eq!(decide(approve, None, user_code.clone()).await.0, 401);
    let key = relay.token("alice", "acme");
    let (access, _) = exchange(&relay, &key).await;
    let (code, answer) = decide(approve, Some(access.clone()), user_code.to_lowercase()).await;
    assert_eq!(code, 200, "{answer}");
    assert_eq!(
        (answer["name"].as_str(), answer["approved"].as_bool()),
        (Some("laptop"), Some(true))
    );
    let (code, answer) = decide("/v1/auth/device/deny", Some(access.clone()), user_code).await;
    assert_eq!(code, 409, "{answer}");
    let (code, answer) = decide(approve, Some(access.clone()), "BCDF-GHJK".into()).await;
    assert_eq!(code, 404, "{answer}");

    // A second login of alice's, named; bob's is not hers to revoke.
    let (code, _) = post_token(
        &relay,
        json!({"grant_type": "api_key", "api_key": key, "name": "desk"}),
    )
    .await;
    assert_eq!(code, 200);
    let bob = relay.token("bob", "acme");
    let (bob_access, _) = exchange(&relay, &bob).await;
    let (code, devices) = relay.http("GET", "/v1/devices", Some(&access), None).await;
    assert_eq!(code, 200, "{devices}");
    let devices = devices["devices"].as_array().unwrap().clone();
    assert_eq!(devices.len(), 2, "{devices:?}");
    assert_eq!(devices.iter().filter(|d| d["current"] == true).count(), 1);
    let desk = devices.iter().find(|d| d["name"] == "desk").unwrap();
    let id = desk["id"].as_str().unwrap();
    let path = format!("/v1/devices/{id}");
    assert_eq!(
        relay.http("DELETE", &path, Some(&bob_access), None).await.0,
        404
    );
    let (code, revoked) = relay.http("DELETE", &path, Some(&access), None).await;
    assert_eq!((code, revoked["name"].as_str()), (200, Some("desk")));
    let (_, devices) = relay.http("GET", "/v1/devices", Some(&access), None).await;
    assert_eq!(devices["devices"].as_array().unwrap().len(), 1);
    // The polling machine's code, still pending redemption, waits its interval.
    let (code, answer) = post_token(&relay, poll).await;
    assert_eq!((code, answer["error"].as_str()), (400, Some("slow_down")));
}
