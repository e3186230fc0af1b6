-- The cloudd plugin: what the commands do and what the buffers show. The sessions buffer
-- (`cloudd://sessions`) mirrors the daemon's replica, kept fresh by the `sessions`
-- notifications; the follow buffer (`cloudd://session/ID`) shows one session's log (the
-- replay, then live entries) and, below it, its pending permission prompts.
--
-- It owns the plugin's state: the sessions seen, the followed session with the last log seq
-- shown, and its prompts. After every hello (the first, and each reconnect after the daemon
-- restarted) it subscribes again, lists the sessions again, and attaches again from the
-- last seq it showed, so that no entry is shown twice or missed. It never talks to the
-- socket itself (rpc.lua does) and never starts a daemon except through rpc.lua.

local rpc = require('cloudd.rpc')

local M = {}

local config = {
  cloudctl = 'cloudctl',
  socket = nil,
  backoff_initial_ms = 100,
  backoff_max_ms = 3000,
}

--- Everything the plugin knows; read-only for anyone else (the tests look at it).
local state = {
  client = nil,
  connection = 'stopped',
  connection_reason = nil,
  connects = 0,
  sessions = {},
  relay = nil,
  sessions_buf = nil,
  follow = nil,
  teleport_progress = {},
  messages = {},
}
M.state = state

-- A session id: `s-` and 16 hex digits.
local SESSION_ID = '^s%-' .. string.rep('%x', 16) .. '$'

local function notify(message, level)
  table.insert(state.messages, message)
  if #state.messages > 200 then
    table.remove(state.messages, 1)
  end
  vim.notify('cloudd: ' .. message, level or vim.log.levels.INFO)
end

local function report_error(what)
  return function(err)
    notify(what .. ': ' .. tostring(err.message), vim.log.levels.ERROR)
  end
end

local function is_nil(value)
  return value == nil or value == vim.NIL
end

local function compact(value)
  if type(value) == 'string' then
    return value
  end
  local ok, text = pcall(vim.json.encode, value)
  return ok and text or tostring(value)
end

-- Buffers ------------------------------------------------------------------------------

local function scratch(name)
  for _, existing in ipairs(vim.api.nvim_list_bufs()) do
    if vim.api.nvim_buf_get_name(existing) == name then
      return existing
    end
  end
  local buf = vim.api.nvim_create_buf(true, true)
  vim.api.nvim_buf_set_name(buf, name)
  vim.bo[buf].buftype = 'nofile'
  vim.bo[buf].bufhidden = 'hide'
  vim.bo[buf].swapfile = false
  vim.bo[buf].modifiable = false
  return buf
end

local function set_lines(buf, first, last, lines)
  if not (buf and vim.api.nvim_buf_is_valid(buf)) then
    return
  end
  vim.bo[buf].modifiable = true
  vim.api.nvim_buf_set_lines(buf, first, last, false, lines)
  vim.bo[buf].modifiable = false
end

local function show(buf)
  for _, win in ipairs(vim.api.nvim_list_wins()) do
    if vim.api.nvim_win_get_buf(win) == buf then
      vim.api.nvim_set_current_win(win)
      return
    end
  end
  vim.api.nvim_win_set_buf(0, buf)
end

-- The sessions buffer ------------------------------------------------------------------

local function connection_line()
  if state.connection == 'ready' then
    local relay = state.relay
    if not relay then
      return 'cloudd: connected'
    end
    local who = is_nil(relay.user) and '' or (' as ' .. relay.user .. '@' .. tostring(relay.org))
    return 'cloudd: connected; relay ' .. tostring(relay.state) .. ' (' .. tostring(relay.mode)
      .. who .. ')'
  elseif state.connection == 'retrying' then
    return 'cloudd: disconnected (' .. tostring(state.connection_reason) .. '); reconnecting'
  end
  return 'cloudd: ' .. state.connection
end

local function pad(text, width)
  text = tostring(text)
  if #text >= width then
    return text .. ' '
  end
  return text .. string.rep(' ', width - #text)
end

local function render_sessions()
  local buf = state.sessions_buf
  if not (buf and vim.api.nvim_buf_is_valid(buf)) then
    return
  end
  local list = {}
  for _, session in pairs(state.sessions) do
    list[#list + 1] = session
  end
  table.sort(list, function(a, b)
    if a.last_activity ~= b.last_activity then
      return (a.last_activity or 0) > (b.last_activity or 0)
    end
    return a.id < b.id
  end)
  local lines = {
    connection_line(),
    pad('ID', 19) .. pad('STATUS', 10) .. pad('VISIBILITY', 11) .. 'TASK',
  }
  for _, s in ipairs(list) do
    local task = tostring(s.task or ''):gsub('\n', ' ')
    lines[#lines + 1] = pad(s.id, 19) .. pad(s.status, 10) .. pad(s.visibility, 11) .. task
  end
  if #list == 0 then
    lines[#lines + 1] = '(no sessions: create one with `cloudctl session create`)'
  end
  set_lines(buf, 0, -1, lines)
end

-- The follow buffer ----------------------------------------------------------------------

local function author_name(author)
  if type(author) == 'table' and author.user then
    return author.user
  end
  return tostring(author)
end

local function content_text(content)
  if type(content) == 'string' then
    return content
  end
  if type(content) ~= 'table' then
    return compact(content)
  end
  local parts = {}
  for _, block in ipairs(content) do
    if type(block) == 'table' and block.type == 'text' then
      parts[#parts + 1] = tostring(block.text)
    elseif type(block) == 'table' and block.type == 'tool_use' then
      parts[#parts + 1] = 'uses ' .. tostring(block.name) .. ' ' .. compact(block.input)
    else
      parts[#parts + 1] = compact(block)
    end
  end
  return table.concat(parts, '\n')
end

--- What an entry's message says, in words.
local function describe_message(author, message)
  if type(message) ~= 'table' then
    return author .. ': ' .. tostring(message)
  end
  local kind = message.type
  if kind == 'user' and type(message.message) == 'table' then
    return author .. '> ' .. content_text(message.message.content)
  elseif kind == 'assistant' and type(message.message) == 'table' then
    return author .. ': ' .. content_text(message.message.content)
  elseif kind == 'result' then
    return 'result: ' .. tostring(message.subtype) .. ', ' .. compact(message.result)
  elseif kind == 'control_request' and type(message.request) == 'table' then
    local request = message.request
    if request.subtype == 'can_use_tool' then
      return author .. ' asks to use ' .. tostring(request.tool_name) .. ': '
        .. compact(request.input) .. ' [' .. tostring(message.request_id) .. ']'
    end
    return author .. ' control request ' .. tostring(request.subtype)
  elseif kind == 'control_response' and type(message.response) == 'table' then
    local response = message.response
    local decision = type(response.response) == 'table' and response.response.behavior
    if decision then
      local why = response.response.message
      return author .. ' answered ' .. tostring(response.request_id) .. ': ' .. decision
        .. ((type(why) == 'string' and why ~= '') and (' (' .. why .. ')') or '')
    end
    return author .. ' control response ' .. tostring(response.subtype) .. ' '
      .. tostring(response.request_id)
  elseif kind == 'control_cancel_request' then
    return author .. ' withdrew prompt ' .. tostring(message.request_id)
  elseif kind == 'system' and message.subtype == 'not_processed' then
    return 'not processed: ' .. tostring(message.message) .. ' (' .. tostring(message.reason) .. ')'
  elseif kind == 'system' and message.subtype == 'not_delivered' then
    return 'not delivered: ' .. tostring(message.reason) .. ' (' .. tostring(message.message) .. ')'
  end
  return author .. ': ' .. compact(message)
end

--- The buffer lines of one log entry: the first starts with `#SEQ`, the rest are indented.
local function entry_lines(entry)
  local author = author_name(entry.author)
  local text
  if not is_nil(entry.status) then
    text = 'status ' .. tostring(entry.status)
      .. (is_nil(entry.reason) and '' or (' (' .. tostring(entry.reason) .. ')'))
  elseif not is_nil(entry.snapshot) then
    local snap = entry.snapshot
    text = author .. ' snapshot v' .. tostring(snap.version) .. ' (' .. tostring(snap.files)
      .. ' files, ' .. tostring(snap.bytes) .. ' bytes)'
  else
    text = describe_message(author, entry.message)
  end
  local time = type(entry.at) == 'number' and os.date('%H:%M:%S', math.floor(entry.at / 1000)) or '?'
  local out = {}
  for i, line in ipairs(vim.split(text, '\n', { plain = true })) do
    if i == 1 then
      out[1] = '#' .. tostring(entry.seq) .. ' ' .. time .. ' ' .. line
    else
      out[#out + 1] = '    ' .. line
    end
  end
  return out
end

local function prompt_lines(follow)
  local list = {}
  for _, prompt in pairs(follow.prompts) do
    list[#list + 1] = prompt
  end
  table.sort(list, function(a, b)
    return a.seq < b.seq
  end)
  if #list == 0 then
    return {}
  end
  local lines = { '', '-- pending permission prompts (:CloudAllow / :CloudDeny) --' }
  for _, p in ipairs(list) do
    lines[#lines + 1] = 'PROMPT ' .. p.request_id .. ': ' .. p.tool_name .. ' ' .. p.input
  end
  return lines
end

local function render_prompts(follow)
  set_lines(follow.buf, follow.log_end, -1, prompt_lines(follow))
end

local function header_line(follow)
  local session = state.sessions[follow.id]
  if session then
    return 'session ' .. follow.id .. ' (' .. tostring(session.status) .. ', '
      .. tostring(session.visibility) .. '): ' .. tostring(session.task)
  end
  return 'session ' .. follow.id
end

local function render_header(follow)
  set_lines(follow.buf, 0, 1, { header_line(follow) })
end

--- The oldest pending prompt of the followed session, or the one with `request_id`.
local function pending_prompt(follow, request_id)
  if request_id then
    return follow.prompts[request_id]
  end
  local oldest
  for _, prompt in pairs(follow.prompts) do
    if not oldest or prompt.seq < oldest.seq then
      oldest = prompt
    end
  end
  return oldest
end

-- A prompt is pending until an answer or withdrawal with a later seq is in the log
-- (a new agent may reuse an old request id).
local function open_prompt(follow, prompt)
  local closed = follow.closed[prompt.request_id]
  if closed and closed > prompt.seq then
    return false
  end
  local known = follow.prompts[prompt.request_id]
  if known and known.seq >= prompt.seq then
    return false
  end
  local new = known == nil
  follow.prompts[prompt.request_id] = prompt
  return new
end

local function track_prompts(follow, entry)
  local message = entry.message
  if type(message) ~= 'table' then
    return
  end
  if message.type == 'control_request' and type(message.request) == 'table'
    and message.request.subtype == 'can_use_tool' and type(message.request_id) == 'string' then
    local prompt = {
      request_id = message.request_id,
      tool_name = tostring(message.request.tool_name),
      input = compact(message.request.input),
      seq = entry.seq,
    }
    if open_prompt(follow, prompt) and follow.live then
      notify(follow.id .. ' asks to use ' .. prompt.tool_name .. ': ' .. prompt.input
        .. ' (:CloudAllow / :CloudDeny)', vim.log.levels.WARN)
    end
    return
  end
  local closed_id
  if message.type == 'control_response' and type(message.response) == 'table' then
    closed_id = message.response.request_id
  elseif message.type == 'control_cancel_request' then
    closed_id = message.request_id
  end
  if type(closed_id) == 'string' then
    follow.closed[closed_id] = math.max(follow.closed[closed_id] or 0, entry.seq)
    local prompt = follow.prompts[closed_id]
    if prompt and prompt.seq < entry.seq then
      follow.prompts[closed_id] = nil
    end
  end
end

local function on_entry(session_id, entry)
  local follow = state.follow
  if not follow or follow.id ~= session_id or type(entry) ~= 'table'
    or type(entry.seq) ~= 'number' then
    return
  end
  -- Each entry once: the daemon sends each at most once per connection, and after a
  -- reconnect the plugin attaches from the last seq it showed; this guard keeps the buffer
  -- right even if an old connection's entries were still in flight.
  if entry.seq <= follow.last_seq then
    follow.skipped = follow.skipped + 1
    return
  end
  follow.last_seq = entry.seq
  local lines = entry_lines(entry)
  set_lines(follow.buf, follow.log_end, follow.log_end, lines)
  follow.log_end = follow.log_end + #lines
  track_prompts(follow, entry)
  render_prompts(follow)
end

local function attach(follow)
  local client = state.client
  local since = follow.attached_once and follow.last_seq or vim.NIL
  client:request('attach', { session = follow.id, since = since }, function(err)
    if err then
      report_error('cannot follow ' .. follow.id)(err)
      return
    end
    follow.attached_once = true
    follow.live = true
  end)
  -- The prompts older than the replay: the daemon's list, less any answer seen since.
  client:request('permissions', { session = follow.id }, function(err, prompts)
    if err or state.follow ~= follow or type(prompts) ~= 'table' then
      return
    end
    for _, p in ipairs(prompts) do
      open_prompt(follow, {
        request_id = p.request_id,
        tool_name = tostring(p.tool_name),
        input = tostring(p.input),
        seq = p.seq,
      })
    end
    render_prompts(follow)
  end)
end

-- The connection ------------------------------------------------------------------------

local function on_notification(method, params)
  if method == 'session/log' and type(params) == 'table' then
    on_entry(params.session, params.entry)
  elseif method == 'session/changed' and type(params) == 'table' and params.id then
    state.sessions[params.id] = params
    render_sessions()
    if state.follow and state.follow.id == params.id then
      render_header(state.follow)
    end
  elseif method == 'session/removed' and type(params) == 'table' then
    state.sessions[params.session] = nil
    render_sessions()
  elseif method == 'relay' then
    state.relay = params
    render_sessions()
  elseif method == 'event/refused' and type(params) == 'table' then
    notify('the relay refused event ' .. tostring(params.seq) .. ' for ' .. tostring(params.session)
      .. ': ' .. tostring(params.reason), vim.log.levels.ERROR)
  elseif method == 'teleport/progress' and type(params) == 'table' then
    -- The latest few, for whoever wants to look (watches report for as long as they run).
    table.insert(state.teleport_progress, params)
    if #state.teleport_progress > 100 then
      table.remove(state.teleport_progress, 1)
    end
    vim.api.nvim_echo({ {
      string.format('cloudd teleport %s: %s %d/%d files, %d/%d bytes', tostring(params.root),
        tostring(params.phase), params.done or 0, params.total or 0, params.bytes_done or 0,
        params.bytes_total or 0),
    } }, false, {})
  elseif method == 'teleport/done' and type(params) == 'table' then
    notify('teleport ' .. tostring(params.root) .. ': now at version ' .. tostring(params.version)
      .. ' (' .. tostring(params.files) .. ' files changed)')
  end
end

local function refresh_sessions()
  state.client:request('session/list', nil, function(err, result)
    if err then
      report_error('cannot list sessions')(err)
      return
    end
    state.sessions = {}
    for _, session in ipairs(result.sessions or {}) do
      state.sessions[session.id] = session
    end
    render_sessions()
    if state.follow then
      render_header(state.follow)
    end
  end)
end

local function on_ready(client)
  state.connects = state.connects + 1
  -- Subscriptions never replay: subscribe first, then list, so nothing falls between.
  client:request('subscribe', { topics = { 'sessions', 'teleport' } }, function(err)
    if err then
      report_error('cannot subscribe')(err)
    end
  end)
  refresh_sessions()
  client:request('whoami', nil, function(err, identity)
    if not err and type(identity) == 'table' then
      state.relay = identity.relay
      render_sessions()
    end
  end)
  if state.follow then
    attach(state.follow)
  end
end

local function client()
  if not state.client then
    state.client = rpc.new({
      cloudctl = config.cloudctl,
      socket = config.socket,
      backoff_initial_ms = config.backoff_initial_ms,
      backoff_max_ms = config.backoff_max_ms,
      on_ready = on_ready,
      on_notification = on_notification,
      on_state = function(connection, reason)
        state.connection = connection
        state.connection_reason = reason
        if connection == 'retrying' and state.follow then
          state.follow.live = false
        end
        render_sessions()
      end,
      on_error = function(message)
        notify(message, vim.log.levels.ERROR)
      end,
    })
  end
  return state.client
end

-- Commands ---------------------------------------------------------------------------------

--- Options: `cloudctl` (the command that starts the daemon), `socket` (a path instead of
--- the location rule), `backoff_initial_ms`, `backoff_max_ms`.
function M.setup(opts)
  config = vim.tbl_extend('force', config, opts or {})
end

--- Connects (starting the daemon if it is absent) without showing anything.
function M.connect()
  client():ensure(true)
end

--- `:CloudSessions`: the sessions buffer.
function M.sessions()
  local c = client()
  state.sessions_buf = scratch('cloudd://sessions')
  local buf = state.sessions_buf
  vim.api.nvim_buf_set_keymap(buf, 'n', '<CR>', '', {
    noremap = true,
    silent = true,
    callback = function()
      M.follow({})
    end,
  })
  vim.api.nvim_buf_set_keymap(buf, 'n', 'r', '', {
    noremap = true,
    silent = true,
    callback = function()
      M.sessions()
    end,
  })
  render_sessions()
  show(buf)
  if c.state == 'ready' then
    refresh_sessions()
  else
    c:ensure(true)
  end
end

local function session_under_cursor()
  if vim.api.nvim_get_current_buf() ~= state.sessions_buf then
    return nil
  end
  local line = vim.api.nvim_get_current_line()
  local id = line:match('^(s%-%x+)%s')
  return id
end

--- `:CloudFollow [ID]`: the session's log buffer (replay, then live). Without an id, the
--- session under the cursor in the sessions buffer.
function M.follow(args)
  local id = args[1] or session_under_cursor()
  if not id then
    notify('which session? :CloudFollow ID (see :CloudSessions)', vim.log.levels.ERROR)
    return
  end
  local c = client()
  if state.follow and state.follow.id == id then
    show(state.follow.buf)
    return
  end
  if state.follow then
    if c.state == 'ready' then
      c:request('detach', { session = state.follow.id })
    end
  end
  local follow = {
    id = id,
    last_seq = 0,
    skipped = 0,
    prompts = {},
    closed = {},
    attached_once = false,
    live = false,
    buf = scratch('cloudd://session/' .. id),
  }
  set_lines(follow.buf, 0, -1, { 'session ' .. id })
  follow.log_end = 1
  render_header(follow)
  state.follow = follow
  show(follow.buf)
  if c.state == 'ready' then
    attach(follow)
  else
    -- Attached by on_ready once connected.
    c:ensure(true)
  end
end

local function target_session(explicit)
  if explicit then
    return explicit
  end
  if state.follow then
    return state.follow.id
  end
  notify('no session: give an id, or follow one with :CloudFollow ID', vim.log.levels.ERROR)
  return nil
end

--- `:CloudSend [ID] TEXT`: a message to the session (the followed one by default).
function M.send(text)
  local id, rest = text:match('^%s*(s%-%x+)%s+(.*)$')
  if not id or not id:match(SESSION_ID) then
    id, rest = nil, vim.trim(text)
  end
  local session = target_session(id)
  if not session or rest == '' then
    if session then
      notify('nothing to send: :CloudSend [ID] TEXT', vim.log.levels.ERROR)
    end
    return
  end
  client():request('send', { session = session, text = rest }, function(err, result)
    if err then
      report_error('cannot send to ' .. session)(err)
    else
      notify('sent to ' .. session .. ' (seq ' .. tostring(result.seq) .. ', '
        .. tostring(result.state) .. ')')
    end
  end)
end

local function answer(decision, request_id)
  local follow = state.follow
  if not follow then
    notify('no session followed: :CloudFollow ID first', vim.log.levels.ERROR)
    return
  end
  local prompt = pending_prompt(follow, request_id)
  if not prompt then
    notify('no pending permission prompt in ' .. follow.id
      .. (request_id and (' with id ' .. request_id) or ''), vim.log.levels.ERROR)
    return
  end
  client():request('answer', {
    session = follow.id,
    request_id = prompt.request_id,
    decision = decision,
  }, function(err, result)
    if err then
      local kind = type(err.data) == 'table' and err.data.kind
      if kind == 'already_answered' and follow.prompts[prompt.request_id] == prompt then
        follow.prompts[prompt.request_id] = nil
        render_prompts(follow)
      end
      report_error('cannot answer ' .. prompt.request_id)(err)
      return
    end
    notify(decision.behavior .. ' ' .. prompt.tool_name .. ' ' .. prompt.input .. ' ('
      .. tostring(result.state) .. ')')
  end)
end

--- `:CloudAllow [REQUEST_ID]`: allows the followed session's oldest pending prompt.
function M.allow(args)
  answer({ behavior = 'allow' }, args[1])
end

--- `:CloudDeny [MESSAGE]`: denies the followed session's oldest pending prompt.
function M.deny(text)
  local message = vim.trim(text or '')
  answer({ behavior = 'deny', message = message ~= '' and message or 'denied by the user' })
end

--- `:CloudInterrupt [ID]`: interrupts the session's agent (the followed one by default).
function M.interrupt(args)
  local session = target_session(args[1])
  if not session then
    return
  end
  client():request('interrupt', { session = session }, function(err, result)
    if err then
      report_error('cannot interrupt ' .. session)(err)
    else
      notify('interrupt sent to ' .. session .. ' (' .. tostring(result.state) .. ')')
    end
  end)
end

local function absolute(path)
  local full = vim.fn.fnamemodify(path ~= nil and path ~= '' and path or (vim.uv or vim.loop).cwd(), ':p')
  if #full > 1 then
    full = full:gsub('/+$', '')
  end
  return full
end

local function describe_link(link)
  local watching = link.watching and 'watching' or 'not watching'
  local text = link.root .. ' -> ' .. link.session .. ' v' .. tostring(link.version)
    .. ' (remote v' .. tostring(link.remote_version) .. ', ' .. watching .. ', watcher '
    .. tostring(link.watcher) .. ')'
  if not is_nil(link.last_error) then
    text = text .. ' last error: ' .. tostring(link.last_error)
  end
  if type(link.conflicts) == 'table' and #link.conflicts > 0 then
    text = text .. ' conflicts: ' .. table.concat(link.conflicts, ', ')
  end
  return text
end

local function describe_outcome(verb, outcome)
  local text = verb .. ' ' .. outcome.root .. ' <-> ' .. outcome.session .. ': version '
    .. tostring(outcome.version) .. ', ' .. tostring(outcome.files) .. ' files changed, '
    .. tostring(outcome.bytes) .. ' bytes moved'
  if type(outcome.conflicts) == 'table' and #outcome.conflicts > 0 then
    text = text .. '; conflicts: ' .. table.concat(outcome.conflicts, ', ')
  end
  if type(outcome.problems) == 'table' and #outcome.problems > 0 then
    text = text .. '; problems: ' .. table.concat(outcome.problems, '; ')
  end
  return text
end

--- `:CloudTeleport push|pull|watch|stop|status [PATH]`: the `teleport/*` methods on PATH
--- (the working directory by default) and the followed session.
function M.teleport(args)
  local verb = args[1]
  local path = absolute(args[2])
  local c = client()
  local function links(what)
    return function(err, result)
      if err then
        report_error('teleport ' .. verb .. ' failed')(err)
        return
      end
      local lines = {}
      for _, link in ipairs(result or {}) do
        lines[#lines + 1] = describe_link(link)
      end
      notify(what .. (#lines == 0 and ': no links' or (':\n' .. table.concat(lines, '\n'))))
    end
  end
  if verb == 'push' or verb == 'pull' then
    local params = { path = path }
    if state.follow then
      params.session = state.follow.id
    elseif verb == 'push' then
      notify('teleport push needs a session: :CloudFollow ID first', vim.log.levels.ERROR)
      return
    end
    notify('teleport ' .. verb .. ' ' .. path .. ' started')
    c:request('teleport/' .. verb, params, function(err, outcome)
      if err then
        report_error('teleport ' .. verb .. ' of ' .. path .. ' failed')(err)
      else
        notify(describe_outcome(verb == 'push' and 'pushed' or 'pulled', outcome))
      end
    end)
  elseif verb == 'watch' then
    local session = target_session(nil)
    if not session then
      return
    end
    c:request('teleport/watch', { path = path, session = session }, links('watching'))
  elseif verb == 'stop' then
    c:request('teleport/stop', { path = path }, links('stopped watching'))
  elseif verb == 'status' then
    c:request('teleport/status', nil, links('teleport links'))
  else
    notify('usage: :CloudTeleport push|pull|watch|stop|status [PATH]', vim.log.levels.ERROR)
  end
end

--- Session ids for completion.
function M.complete_sessions(lead)
  local out = {}
  for id in pairs(state.sessions) do
    if id:sub(1, #lead) == lead then
      out[#out + 1] = id
    end
  end
  table.sort(out)
  return out
end

return M
