//! The blob socket end to end: a real relay on 127.0.0.1:0 and a raw WebSocket client
//! speaking the blob protocol.

mod common;

use cloud_protocol::blobs::{
    self, Blob, BlobAnswer, BlobMessage, BlobReply, BlobRequest, BLOBS_PATH,
};
use cloud_protocol::teleport::ContentId;
use common::*;
use futures_util::{SinkExt as _, StreamExt as _};
use tokio_tungstenite::tungstenite::Message;

async fn ask(socket: &mut Socket, id: u64, request: BlobRequest) -> BlobReply {
    let bytes = blobs::encode(&BlobMessage { id, request }).unwrap();
    socket.send(Message::Binary(bytes.into())).await.unwrap();
    loop {
        match socket
            .next()
            .await
            .expect("the relay closed the blob socket")
        {
            Ok(Message::Binary(bytes)) => return blobs::decode(&bytes).unwrap(),
            Ok(_) => continue,
            Err(e) => panic!("the blob socket failed: {e}"),
        }
    }
}

/// The daemon does not hash what it uploads (a file read for an upload may have changed
/// since its scan): the relay's check is the one, and its answer names the blob, so the
/// daemon can scan again. Nothing of a refused batch is stored.
#[tokio::test]
async fn a_blob_that_does_not_match_its_id_is_answered_by_name_and_nothing_is_stored() {
    let relay = TestRelay::start(shell_agent()).await;
    let token = relay.token("alice", "acme");
    let session = relay.create(&token, r#"{"task": "blobs"}"#).await;
    let session = session["id"].as_str().unwrap().to_owned();
    let mut socket = websocket(relay.addr, BLOBS_PATH, &token).await.unwrap();

    let good = Blob {
        id: ContentId::of(b"as scanned"),
        bytes: b"as scanned".to_vec(),
    };
    let changed = Blob {
        id: ContentId::of(b"as hashed"),
        bytes: b"as read later".to_vec(),
    };
    let reply = ask(
        &mut socket,
        1,
        BlobRequest::Put {
            session: session.clone(),
            blobs: vec![good.clone(), changed.clone()],
        },
    )
    .await;
    assert_eq!(reply.id, 1);
    assert_eq!(reply.result, Ok(BlobAnswer::Mismatched { id: changed.id }));

    let reply = ask(
        &mut socket,
        2,
        BlobRequest::Get {
            session: session.clone(),
            ids: vec![good.id, changed.id],
        },
    )
    .await;
    assert_eq!(
        reply.result,
        Ok(BlobAnswer::Blobs {
            blobs: Vec::new(),
            missing: vec![good.id, changed.id],
        }),
        "a refused batch stores nothing"
    );

    let reply = ask(
        &mut socket,
        3,
        BlobRequest::Put {
            session: session.clone(),
            blobs: vec![good.clone()],
        },
    )
    .await;
    assert_eq!(reply.result, Ok(BlobAnswer::Stored { new: 1 }));
    let reply = ask(
        &mut socket,
        4,
        BlobRequest::Get {
            session,
            ids: vec![good.id],
        },
    )
    .await;
    assert_eq!(
        reply.result,
        Ok(BlobAnswer::Blobs {
            blobs: vec![good],
            missing: Vec::new(),
        })
    );
}
