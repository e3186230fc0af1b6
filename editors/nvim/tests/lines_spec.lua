-- The line splitter (lua/cloudd/lines.lua), property-tested: for arbitrary bytes cut into
-- arbitrary chunks it yields the same lines as splitting the whole at once, never errors
-- under its limit, and refuses a line over it.

local T = require('runner')
local lines = require('cloudd.lines')

local CASES = 300

local function random_bytes(rng_len)
  local out = {}
  for i = 1, rng_len do
    -- Newlines and carriage returns often, so that lines are short and many.
    local r = math.random(0, 9)
    if r == 0 then
      out[i] = '\n'
    elseif r == 1 then
      out[i] = '\r'
    else
      out[i] = string.char(math.random(0, 255))
    end
  end
  return table.concat(out)
end

local function reference(bytes)
  local out = {}
  local start = 1
  while true do
    local nl = bytes:find('\n', start, true)
    if not nl then
      return out, bytes:sub(start)
    end
    local line = bytes:sub(start, nl - 1)
    if line:sub(-1) == '\r' then
      line = line:sub(1, -2)
    end
    out[#out + 1] = line
    start = nl + 1
  end
end

T.test('lines: any bytes in any chunks split as the whole does', function()
  math.randomseed(tonumber(os.getenv('CLOUDD_NVIM_SEED') or '') or os.time())
  for case = 1, CASES do
    local bytes = random_bytes(math.random(0, 400))
    local expected, rest = reference(bytes)
    local splitter = lines.new(1000)
    local got = {}
    local at = 1
    while at <= #bytes do
      local size = math.random(1, 40)
      local chunk = bytes:sub(at, at + size - 1)
      at = at + size
      local out, err = splitter:feed(chunk)
      T.ok(out, 'case ' .. case .. ': ' .. tostring(err))
      vim.list_extend(got, out)
    end
    T.eq(got, expected, 'case ' .. case)
    T.eq(#rest, splitter.size, 'case ' .. case .. ': the partial line kept')
    for _, line in ipairs(got) do
      -- Decoding arbitrary bytes never raises.
      local value = lines.decode(line)
      T.ok(value == nil or type(value) == 'table')
    end
  end
end)

T.test('lines: a line over the limit is refused, fed whole or in pieces', function()
  local splitter = lines.new(10)
  T.eq(splitter:feed('0123456789\n'), { '0123456789' })
  local out, err = splitter:feed('0123456789A\n')
  T.eq(out, nil)
  T.ok(err:find('over 10 bytes'), err)
  splitter = lines.new(10)
  T.ok(splitter:feed('012345'))
  out, err = splitter:feed('67890')
  T.eq(out, nil)
  T.ok(err:find('over 10 bytes'), err)
end)

T.test('lines: JSON objects decode, other JSON does not', function()
  T.eq(lines.decode('{"jsonrpc":"2.0","id":1,"result":"pong"}').result, 'pong')
  T.eq(lines.decode('[1,2]') ~= nil, true) -- an array is a table too; dispatch ignores it
  T.eq(lines.decode('"text"'), nil)
  T.eq(lines.decode('{"unterminated'), nil)
  T.eq(lines.decode('   '), nil)
end)
