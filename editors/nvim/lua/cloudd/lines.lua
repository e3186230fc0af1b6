-- Splits the bytes read from the daemon's socket into lines (newline-delimited JSON-RPC,
-- docs/PROTOCOL.md "Lines"). It owns the partial line between reads and its size limit; it
-- never decodes JSON and never touches the socket.

local M = {}

--- The longest line accepted, as on the daemon's side: 16 MiB, not counting the newline.
M.MAX_LINE = 16 * 1024 * 1024

local Splitter = {}
Splitter.__index = Splitter

--- A splitter with an optional smaller limit (tests use one).
function M.new(limit)
  return setmetatable({ parts = {}, size = 0, limit = limit or M.MAX_LINE }, Splitter)
end

--- Takes the next chunk read. Returns the complete lines it ends, without their newlines
--- and with a trailing `\r` removed; or nil and an error when a line grows over the
--- limit, after which the splitter must not be used again (the connection is broken).
function Splitter:feed(chunk)
  local lines = {}
  local start = 1
  while true do
    local newline = chunk:find('\n', start, true)
    if not newline then
      break
    end
    local piece = chunk:sub(start, newline - 1)
    if self.size + #piece > self.limit then
      return nil, 'the daemon sent a line over ' .. self.limit .. ' bytes'
    end
    self.parts[#self.parts + 1] = piece
    local line = table.concat(self.parts)
    self.parts, self.size = {}, 0
    if line:sub(-1) == '\r' then
      line = line:sub(1, -2)
    end
    lines[#lines + 1] = line
    start = newline + 1
  end
  local rest = chunk:sub(start)
  if rest ~= '' then
    self.size = self.size + #rest
    if self.size > self.limit then
      return nil, 'the daemon sent a line over ' .. self.limit .. ' bytes'
    end
    self.parts[#self.parts + 1] = rest
  end
  return lines
end

--- Decodes one line as a JSON object; nil for an empty line, for anything that is not
--- JSON, and for JSON that is not an object (the daemon sends none of those).
function M.decode(line)
  if line:match('^%s*$') then
    return nil
  end
  local ok, value = pcall(vim.json.decode, line)
  if not ok or type(value) ~= 'table' then
    return nil
  end
  return value
end

return M
