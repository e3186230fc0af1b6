-- A small test runner for `nvim --headless`: tests registered with `test(name, fn)` run in
-- order; `run()` reports each on stderr (TAP-like) and quits Neovim with exit code 1 if any
-- failed, 0 otherwise. Waits are conditions with deadlines (`wait_for`), never sleeps.

local M = {}

--- How long any one condition may take to come true (as the Rust harness's DEADLINE).
M.DEADLINE_MS = 20000

local tests = {}
local on_failure = {}

function M.test(name, fn)
  tests[#tests + 1] = { name = name, fn = fn }
end

--- Called with the error after a failing test, to print what helps (buffers, messages).
function M.on_failure(fn)
  on_failure[#on_failure + 1] = fn
end

function M.log(text)
  io.stderr:write(text .. '\n')
end

function M.ok(condition, message)
  if not condition then
    error(message or 'assertion failed', 2)
  end
end

function M.eq(actual, expected, message)
  if not vim.deep_equal(actual, expected) then
    error((message or 'not equal') .. ': expected ' .. vim.inspect(expected) .. ', got '
      .. vim.inspect(actual), 2)
  end
end

--- Waits until `condition()` is true, running Neovim's event loop meanwhile; fails after
--- `ms` (default DEADLINE_MS) naming `what`.
function M.wait_for(what, condition, ms)
  ms = ms or M.DEADLINE_MS
  local ok = vim.wait(ms, function()
    local good, result = pcall(condition)
    return good and result
  end, 20)
  if not ok then
    error('timed out after ' .. ms .. ' ms waiting for ' .. what, 2)
  end
end

--- Runs every test, reports, and quits with the exit code.
function M.run()
  local failed = 0
  M.log('1..' .. #tests)
  for i, t in ipairs(tests) do
    local started = (vim.uv or vim.loop).hrtime()
    local ok, err = xpcall(t.fn, debug.traceback)
    local ms = math.floor(((vim.uv or vim.loop).hrtime() - started) / 1e6)
    if ok then
      M.log(string.format('ok %d - %s (%d ms)', i, t.name, ms))
    else
      failed = failed + 1
      M.log(string.format('not ok %d - %s (%d ms)', i, t.name, ms))
      M.log('  ' .. tostring(err):gsub('\n', '\n  '))
      for _, hook in ipairs(on_failure) do
        pcall(hook, err)
      end
    end
  end
  M.log(string.format('# %d passed, %d failed', #tests - failed, failed))
  vim.cmd((failed > 0 and 'cquit 1') or 'qall!')
end

return M
