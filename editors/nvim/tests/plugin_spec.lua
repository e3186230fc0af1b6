-- The plugin against the real daemon and relay (started by e2e/tests/nvim.rs, which passes
-- CLOUDD_HOME, CLOUDD_BIN and CLOUDCTL). The daemon is down when this starts: the first
-- command must start it. The tests run in order and build on each other (one session).

local T = require('runner')
local cloudd = require('cloudd')
local paths = require('cloudd.paths')
local state = cloudd.state

local CLOUDCTL = os.getenv('CLOUDCTL')
if not CLOUDCTL or CLOUDCTL == '' then
  error('CLOUDCTL is not set: run these tests through `cargo test -p cloudd-e2e --test nvim`')
end
cloudd.setup({ cloudctl = CLOUDCTL })

-- Runs a command to completion with the event loop running (the plugin keeps reading).
local function run(args)
  local out, err, code = {}, {}, nil
  local job = vim.fn.jobstart(args, {
    stdout_buffered = true,
    stderr_buffered = true,
    on_stdout = function(_, data)
      out = data
    end,
    on_stderr = function(_, data)
      err = data
    end,
    on_exit = function(_, c)
      code = c
    end,
  })
  T.ok(job > 0, 'cannot run ' .. vim.inspect(args))
  T.wait_for(table.concat(args, ' ') .. ' to finish', function()
    return code ~= nil
  end)
  return code, table.concat(out, '\n'), table.concat(err, '\n')
end

local function cloudctl(...)
  local args = { CLOUDCTL, ... }
  local code, out, err = run(args)
  if code ~= 0 then
    error('`cloudctl ' .. table.concat({ ... }, ' ') .. '` failed (' .. code .. '): ' .. err
      .. out, 2)
  end
  return out
end

local function cloudctl_json(...)
  return vim.json.decode(cloudctl('--json', ...))
end

local function buf_text(buf)
  if not (buf and vim.api.nvim_buf_is_valid(buf)) then
    return ''
  end
  return table.concat(vim.api.nvim_buf_get_lines(buf, 0, -1, false), '\n')
end

local function follow_text()
  return state.follow and buf_text(state.follow.buf) or ''
end

local function has(text, needle)
  return text:find(needle, 1, true) ~= nil
end

--- The seqs of the entries in the follow buffer, in buffer order.
local function shown_seqs()
  local seqs = {}
  for _, line in ipairs(vim.api.nvim_buf_get_lines(state.follow.buf, 0, -1, false)) do
    local seq = line:match('^#(%d+) ')
    if seq then
      seqs[#seqs + 1] = tonumber(seq)
    end
  end
  return seqs
end

--- Each entry shown once, in order, none missing: exactly 1..N.
local function assert_each_entry_once()
  local seqs = shown_seqs()
  T.ok(#seqs > 0, 'no entries shown')
  for i, seq in ipairs(seqs) do
    T.eq(seq, i, 'entry ' .. i .. ' of the follow buffer (seqs shown: '
      .. table.concat(seqs, ',') .. ')')
  end
  T.eq(state.follow.skipped, 0, 'entries the daemon sent twice')
end

--- Whether the plugin told the user something containing `needle`.
local function message_with(needle)
  for _, m in ipairs(state.messages) do
    if has(m, needle) then
      return true
    end
  end
  return false
end

local function prompt_line(command)
  return 'Bash {"command":"' .. command .. '"}'
end

--- Sends from the editor and waits for the agent's prompt to show; returns its request id.
local function send_and_wait_prompt(command)
  vim.cmd('CloudSend ' .. command)
  T.wait_for('the prompt for ' .. command, function()
    return has(follow_text(), prompt_line(command))
  end)
  for id, prompt in pairs(state.follow.prompts) do
    if prompt.input == '{"command":"' .. command .. '"}' then
      return id
    end
  end
  error('no prompt for ' .. command .. ' in the plugin state')
end

T.on_failure(function()
  T.log('--- sessions buffer:\n' .. buf_text(state.sessions_buf))
  T.log('--- follow buffer:\n' .. follow_text())
  T.log('--- messages:\n' .. table.concat(state.messages, '\n'))
  T.log('--- connection: ' .. tostring(state.connection) .. ' ' .. tostring(state.connection_reason))
end)

local session, second_session

T.test(':CloudSessions starts the absent daemon and lists sessions, refreshed by notifications', function()
  T.ok((vim.uv or vim.loop).fs_stat(paths.socket()) == nil, 'the daemon should be down at the start')
  vim.cmd('CloudSessions')
  T.wait_for('the plugin to connect', function()
    return state.connection == 'ready'
  end)
  T.eq(vim.api.nvim_buf_get_name(0), 'cloudd://sessions')

  local created = cloudctl_json('session', 'create', '--task', 'listed in nvim')
  session = created.session.id
  local function row()
    for _, line in ipairs(vim.api.nvim_buf_get_lines(state.sessions_buf, 0, -1, false)) do
      if line:sub(1, #session) == session then
        return line
      end
    end
  end
  T.wait_for('the new session in the sessions buffer', function()
    local line = row()
    return line and has(line, 'private') and has(line, 'listed in nvim')
      and (has(line, 'starting') or has(line, 'running'))
  end)
  cloudctl('session', 'share', session, '--visibility', 'team')
  T.wait_for('the visibility change in the sessions buffer', function()
    local line = row()
    return line and has(line, ' team ')
  end)
  T.ok(has(buf_text(state.sessions_buf), 'relay connected (remote as ann@acme)'),
    buf_text(state.sessions_buf))
end)

T.test(':CloudFollow replays the log, shows the pending prompt, and :CloudAllow answers it', function()
  cloudctl('send', session, 'echo replayed-line')
  -- The prompt is in the log before the editor follows: it can only come from the replay.
  T.wait_for('the prompt to be pending', function()
    return #cloudctl_json('permissions', session) > 0
  end)
  vim.cmd('CloudFollow ' .. session)
  T.eq(vim.api.nvim_buf_get_name(0), 'cloudd://session/' .. session)
  T.wait_for('the replayed message and prompt', function()
    local text = follow_text()
    return has(text, 'ann> echo replayed-line') and has(text, 'PROMPT bash-')
      and has(text, prompt_line('echo replayed-line'))
  end)
  vim.cmd('CloudAllow')
  T.wait_for("the command's output, live", function()
    return has(follow_text(), 'agent: replayed-line')
  end)
  T.wait_for('the answered prompt to leave the buffer', function()
    return not has(follow_text(), 'PROMPT ')
  end)
  T.eq(cloudctl_json('permissions', session), {})
  assert_each_entry_once()
end)

T.test('a prompt answered elsewhere disappears from the buffer', function()
  local request_id = send_and_wait_prompt('echo answered-elsewhere')
  cloudctl('allow', session, request_id)
  T.wait_for('the prompt to disappear', function()
    return not has(follow_text(), 'PROMPT ')
  end)
  T.wait_for("the command's output", function()
    return has(follow_text(), 'agent: answered-elsewhere')
  end)
  T.eq(state.follow.prompts, {})
end)

T.test(':CloudDeny denies with a message and the command never runs', function()
  send_and_wait_prompt('echo must-not-run')
  vim.cmd('CloudDeny not today')
  T.wait_for('the denial', function()
    return has(follow_text(), 'permission denied: not today')
  end)
  T.ok(not has(follow_text(), 'agent: must-not-run'), follow_text())
  T.ok(not has(follow_text(), 'PROMPT '), follow_text())
end)

T.test(':CloudInterrupt stops the running command', function()
  local request_id = send_and_wait_prompt('sleep 30')
  vim.cmd('CloudAllow')
  T.wait_for('the allow in the log', function()
    return has(follow_text(), 'answered ' .. request_id .. ': allow')
  end)
  vim.cmd('CloudInterrupt')
  T.wait_for('the interrupted result', function()
    return has(follow_text(), 'result: error') and has(follow_text(), 'interrupted')
  end)
end)

T.test(':CloudTeleport push (with progress), status, pull, watch and stop', function()
  local dir = vim.fn.tempname()
  vim.fn.mkdir(dir, 'p')
  vim.fn.writefile({ 'hello from nvim' }, dir .. '/hello.txt')
  local root = (vim.uv or vim.loop).fs_realpath(dir)
  vim.cmd('CloudTeleport push ' .. dir)
  T.wait_for('the push to finish', function()
    return message_with('pushed ' .. root .. ' <-> ' .. session .. ': version 1')
  end)
  local progress = vim.tbl_filter(function(p)
    return p.root == root
  end, state.teleport_progress)
  T.ok(#progress > 0, 'no teleport/progress for ' .. root)
  T.wait_for('the snapshot in the log', function()
    return has(follow_text(), 'snapshot v1 (1 files')
  end)
  vim.cmd('CloudTeleport status')
  T.wait_for('the link in the status', function()
    return message_with(root .. ' -> ' .. session .. ' v1 (remote v1, not watching')
  end)
  vim.cmd('CloudTeleport pull ' .. dir)
  T.wait_for('the pull to finish', function()
    return message_with('pulled ' .. root .. ' <-> ' .. session .. ': version 1, 0 files')
  end)
  vim.cmd('CloudTeleport watch ' .. dir)
  T.wait_for('the watch to start', function()
    return message_with('watching:\n' .. root .. ' -> ' .. session .. ' v1 (remote v1, watching')
  end)
  vim.cmd('CloudTeleport stop ' .. dir)
  T.wait_for('the watch to stop', function()
    return message_with('stopped watching:\n' .. root .. ' -> ' .. session .. ' v1 (remote v1, not watching')
  end)
end)

T.test('the daemon restarts: the plugin reconnects and shows nothing twice or lost', function()
  -- Output that the agent writes while the daemon is down must show up after.
  local request_id = send_and_wait_prompt('sleep 2; echo while-down')
  vim.cmd('CloudAllow')
  T.wait_for('the allow in the log', function()
    return has(follow_text(), 'answered ' .. request_id .. ': allow')
  end)
  local connects = state.connects
  cloudctl('down')
  T.wait_for('the plugin to notice', function()
    return state.connection == 'retrying'
  end)
  T.ok(has(buf_text(state.sessions_buf), 'reconnecting'), buf_text(state.sessions_buf))
  cloudctl('up')
  T.wait_for('the plugin to reconnect', function()
    return state.connects == connects + 1 and state.connection == 'ready'
  end)
  T.wait_for('the output written while the daemon was down', function()
    return has(follow_text(), 'agent: while-down')
  end)

  -- Resubscribed: a session created now is listed without :CloudSessions.
  second_session = cloudctl_json('session', 'create', '--task', 'after the restart').session.id
  T.wait_for('the second session in the sessions buffer', function()
    return has(buf_text(state.sessions_buf), second_session)
  end)

  -- :CloudSend with an id goes to that session, not the followed one.
  vim.cmd('CloudSend ' .. second_session .. ' echo to-the-second')
  T.wait_for('the message to reach the second session', function()
    return #cloudctl_json('permissions', second_session) > 0
  end)
  T.ok(not has(follow_text(), 'to-the-second'), follow_text())

  -- Live again, both ways.
  send_and_wait_prompt('echo after-restart')
  vim.cmd('CloudAllow')
  T.wait_for("the command's output after the restart", function()
    return has(follow_text(), 'agent: after-restart')
  end)
  assert_each_entry_once()
end)
