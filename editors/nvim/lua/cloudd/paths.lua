-- Where the daemon's socket is: the location rule of docs/PROTOCOL.md ("Where the socket
-- is"), the same one `Paths::from_env` applies for the daemon and cloudctl. This module only
-- computes a path; it never creates, checks or connects to anything.

local M = {}

-- An environment variable, or nil when it is unset or empty (the rule treats both alike).
local function env(name)
  local value = os.getenv(name)
  if value == nil or value == '' then
    return nil
  end
  return value
end

-- A directory name without its trailing slashes (so joining never doubles them).
local function dir(path)
  local trimmed = path:gsub('/+$', '')
  if trimmed == '' then
    return '/'
  end
  return trimmed
end

local function join(base, ...)
  local out = dir(base)
  if out == '/' then
    out = ''
  end
  for _, part in ipairs({ ... }) do
    out = out .. '/' .. part
  end
  return out
end

--- The socket path: CLOUDD_SOCKET, else CLOUDD_HOME/run/cloudd.sock, else
--- $XDG_RUNTIME_DIR/cloudd/cloudd.sock, else <$TMPDIR or /tmp>/cloudd-$USER/cloudd.sock.
function M.socket()
  local socket = env('CLOUDD_SOCKET')
  if socket then
    return socket
  end
  local home = env('CLOUDD_HOME')
  if home then
    return join(home, 'run', 'cloudd.sock')
  end
  local runtime = env('XDG_RUNTIME_DIR')
  if runtime then
    return join(runtime, 'cloudd', 'cloudd.sock')
  end
  local user = env('USER') or env('USERNAME') or 'user'
  return join(env('TMPDIR') or '/tmp', 'cloudd-' .. user, 'cloudd.sock')
end

return M
