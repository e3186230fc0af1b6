-- The plugin's one connection to cloudd: newline-delimited JSON-RPC 2.0 over the Unix
-- socket (docs/PROTOCOL.md "JSON-RPC 2.0 encoding"), with `vim.loop` pipes and `vim.json`
-- only, so it runs on Neovim 0.7.2 and newer.
--
-- It owns the socket, the request ids, the hello, and reconnecting with backoff when the
-- daemon goes away; after each hello it calls `on_ready`, where the caller resubscribes.
-- It starts the daemon (`cloudctl up`) only when a user's command needs it, never on an
-- automatic reconnect: a daemon stopped on purpose stays stopped until the user asks for
-- something. It knows nothing about sessions and never touches a buffer.

-- `vim.uv` from 0.10 on; `vim.loop`, the same library, before.
local uv = vim.uv or vim.loop
local lines = require('cloudd.lines')
local paths = require('cloudd.paths')

local M = {}

--- The local socket protocol version this client speaks (`PROTOCOL_VERSION`).
M.PROTOCOL = 1
--- This plugin's version, for the daemon's log.
M.VERSION = '0.1.0'

local Client = {}
Client.__index = Client

--- A client, not connected yet. `opts`:
---   on_ready(client, hello)       after each successful hello (resubscribe there)
---   on_notification(method, params)
---   on_state(state, reason)       'connecting' | 'ready' | 'retrying' | 'stopped'
---   on_error(message)             something the user should hear about
---   cloudctl                      the cloudctl command (default 'cloudctl')
---   socket                        a path, or nil for the location rule
---   backoff_initial_ms, backoff_max_ms
function M.new(opts)
  return setmetatable({
    opts = opts,
    state = 'stopped',
    generation = 0,
    next_id = 1,
    pending = {},
    queue = {},
    attempts = 0,
    starting_daemon = false,
  }, Client)
end

function Client:socket_path()
  return self.opts.socket or paths.socket()
end

function Client:_set_state(state, reason)
  self.state = state
  self.reason = reason
  if self.opts.on_state then
    self.opts.on_state(state, reason)
  end
end

--- Connects if not connected or connecting. With `start_daemon`, a missing daemon is
--- started with `cloudctl up` first (a user asked for something).
function Client:ensure(start_daemon)
  if self.state == 'ready' or self.state == 'connecting' then
    return
  end
  if self.timer then
    self.timer:stop()
  end
  self:_dial(start_daemon)
end

function Client:_dial(start_daemon)
  self.generation = self.generation + 1
  local generation = self.generation
  local path = self:socket_path()
  self:_set_state('connecting')
  local pipe = uv.new_pipe(false)
  local function failed(err)
    if not pipe:is_closing() then
      pipe:close()
    end
    if generation ~= self.generation then
      return
    end
    if start_daemon then
      self:_start_daemon(path, err)
    else
      self:_retry('cannot connect to ' .. path .. ': ' .. tostring(err))
    end
  end
  local ok, err = pcall(pipe.connect, pipe, path, function(connect_err)
    vim.schedule(function()
      if connect_err then
        failed(connect_err)
      elseif generation ~= self.generation then
        pipe:close()
      else
        self:_connected(pipe, generation)
      end
    end)
  end)
  if not ok then
    vim.schedule(function()
      failed(err)
    end)
  end
end

function Client:_connected(pipe, generation)
  self.pipe = pipe
  self.splitter = lines.new()
  pipe:read_start(function(err, data)
    vim.schedule(function()
      self:_on_read(generation, err, data)
    end)
  end)
  self:_send('hello', {
    protocol = M.PROTOCOL,
    client = 'cloudd.nvim',
    client_version = M.VERSION,
  }, function(err, hello)
    if generation ~= self.generation then
      return
    end
    if err then
      local kind = type(err.data) == 'table' and err.data.kind or nil
      self:_error('cloudd refused the hello: ' .. tostring(err.message))
      if kind == 'version_mismatch' then
        -- Retrying cannot help: the message says which side to upgrade.
        self:stop()
      else
        self:_lost('hello failed')
      end
      return
    end
    self.attempts = 0
    self.hello = hello
    self:_set_state('ready')
    if self.opts.on_ready then
      self.opts.on_ready(self, hello)
    end
    local queue = self.queue
    self.queue = {}
    for _, item in ipairs(queue) do
      self:_send(item[1], item[2], item[3])
    end
  end)
end

function Client:_start_daemon(path, connect_err)
  if self.starting_daemon then
    -- Stays 'connecting': the running `cloudctl up` dials when it is done.
    return
  end
  local cloudctl = self.opts.cloudctl or 'cloudctl'
  if vim.fn.executable(cloudctl) ~= 1 then
    self:_error('cloudd is not running (' .. path .. ': ' .. tostring(connect_err)
      .. ') and `' .. cloudctl .. '` was not found: install cloudctl or set `cloudctl` in '
      .. "require('cloudd').setup()")
    self:_retry('cloudd is not running')
    return
  end
  self.starting_daemon = true
  local stderr = {}
  local job = vim.fn.jobstart({ cloudctl, 'up' }, {
    stderr_buffered = true,
    on_stderr = function(_, data)
      stderr = data or {}
    end,
    on_exit = function(_, code)
      vim.schedule(function()
        self.starting_daemon = false
        -- Whoever dialled meanwhile found no daemon and waits for this one.
        if self.state == 'stopped' or self.state == 'ready' then
          return
        end
        if code ~= 0 then
          self:_error('`' .. cloudctl .. ' up` failed (exit ' .. code .. '): '
            .. vim.trim(table.concat(stderr, '\n')))
          self:_retry('cloudctl up failed')
        else
          self:_dial(false)
        end
      end)
    end,
  })
  if job <= 0 then
    self.starting_daemon = false
    self:_error('cannot run `' .. cloudctl .. ' up`')
    self:_retry('cannot run cloudctl up')
  end
end

function Client:_retry(reason)
  self.attempts = self.attempts + 1
  local initial = self.opts.backoff_initial_ms or 100
  local max = self.opts.backoff_max_ms or 3000
  local delay = math.min(max, initial * 2 ^ math.min(self.attempts - 1, 20))
  self:_set_state('retrying', reason)
  self.timer = self.timer or uv.new_timer()
  local generation = self.generation
  self.timer:start(delay, 0, function()
    vim.schedule(function()
      if generation == self.generation and self.state == 'retrying' then
        self:_dial(false)
      end
    end)
  end)
end

function Client:_on_read(generation, err, data)
  if generation ~= self.generation then
    return
  end
  if err or data == nil then
    local why = self.closing and (self.closing.code .. ': ' .. tostring(self.closing.message))
      or err or 'the daemon closed the connection'
    self:_lost(why)
    return
  end
  local got, split_err = self.splitter:feed(data)
  if not got then
    self:_lost(split_err)
    return
  end
  for _, line in ipairs(got) do
    local message = lines.decode(line)
    if message then
      self:_dispatch(message)
      if generation ~= self.generation then
        return
      end
    end
  end
end

function Client:_dispatch(message)
  if message.method == nil then
    local callback = message.id ~= nil and self.pending[message.id]
    if callback then
      self.pending[message.id] = nil
      if message.error ~= nil and message.error ~= vim.NIL then
        callback(message.error, nil)
      else
        callback(nil, message.result)
      end
    end
  elseif message.method == 'closing' then
    -- The last message on the connection; the read error that follows says why it ended.
    self.closing = type(message.params) == 'table' and message.params or {}
  elseif self.opts.on_notification then
    self.opts.on_notification(message.method, message.params)
  end
end

function Client:_close_pipe()
  local pipe = self.pipe
  self.pipe = nil
  if pipe and not pipe:is_closing() then
    pcall(pipe.read_stop, pipe)
    pipe:close()
  end
end

--- The connection is gone: every request still waiting fails, and a reconnect is planned.
function Client:_lost(reason)
  self.generation = self.generation + 1
  self.closing = nil
  self:_close_pipe()
  local pending = self.pending
  self.pending = {}
  for _, callback in pairs(pending) do
    callback({
      message = 'the connection to cloudd was lost before it answered (' .. tostring(reason)
        .. '); check with :CloudSessions and try again',
      data = { kind = 'disconnected' },
    }, nil)
  end
  self:_retry(reason)
end

function Client:_error(message)
  if self.opts.on_error then
    self.opts.on_error(message)
  end
end

function Client:_send(method, params, callback)
  local id = self.next_id
  self.next_id = id + 1
  local request = { jsonrpc = '2.0', id = id, method = method }
  if params ~= nil then
    request.params = params
  end
  self.pending[id] = callback or function() end
  self.pipe:write(vim.json.encode(request) .. '\n')
end

--- Sends a request; `callback(err, result)` gets the reply, where `err` is the JSON-RPC
--- error object (`message`, `data.kind`). Before the connection is ready the request
--- waits for it (and a connection is started, starting the daemon if needed).
function Client:request(method, params, callback)
  if self.state == 'ready' then
    self:_send(method, params, callback)
  else
    self.queue[#self.queue + 1] = { method, params, callback or function() end }
    self:ensure(true)
  end
end

--- Closes the connection and stops reconnecting; queued requests are dropped.
function Client:stop()
  self.generation = self.generation + 1
  if self.timer then
    self.timer:stop()
  end
  self:_close_pipe()
  self.pending = {}
  self.queue = {}
  self:_set_state('stopped')
end

return M
