-- Entry point of the plugin's tests:
--   nvim --headless -u NONE -i NONE --cmd 'set rtp^=editors/nvim' -c 'luafile editors/nvim/tests/run.lua'
-- Runs every tests/*_spec.lua in name order. The spec that needs a daemon (plugin_spec.lua)
-- reads its environment from e2e/tests/nvim.rs, which starts the relay and the daemon.

local here = vim.fn.fnamemodify(debug.getinfo(1, 'S').source:sub(2), ':p:h')
package.path = here .. '/?.lua;' .. package.path

-- `-u NONE` loads no plugins: load this one as a plugin manager would.
vim.cmd('runtime plugin/cloudd.lua')

local runner = require('runner')

-- Messages as comment lines of the report, each on its own line.
vim.notify = function(message)
  runner.log('# notify: ' .. tostring(message):gsub('\n', '\n#   '))
end
local ok, err = xpcall(function()
  local only = os.getenv('CLOUDD_NVIM_SPECS')
  for _, file in ipairs(vim.fn.sort(vim.fn.glob(here .. '/*_spec.lua', false, true))) do
    local name = vim.fn.fnamemodify(file, ':t:r')
    if not only or only:find(name, 1, true) then
      dofile(file)
    end
  end
end, debug.traceback)
if not ok then
  runner.log('cannot load the specs: ' .. tostring(err))
  vim.cmd('cquit 2')
end
runner.run()
