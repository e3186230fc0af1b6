-- The plugin's commands. Loading this file only defines them: nothing connects to cloudd
-- until a command is used.

if vim.g.loaded_cloudd then
  return
end
vim.g.loaded_cloudd = 1

local function cloudd()
  return require('cloudd')
end

-- The words of a command's arguments; `fargs` holds an empty string for a missing optional
-- argument on some versions (0.7).
local function words(a)
  return vim.tbl_filter(function(word)
    return word ~= ''
  end, a.fargs)
end

local function complete_sessions(lead)
  return cloudd().complete_sessions(lead)
end

vim.api.nvim_create_user_command('CloudSessions', function()
  cloudd().sessions()
end, { nargs = 0, desc = 'cloudd: list the sessions' })

vim.api.nvim_create_user_command('CloudFollow', function(a)
  cloudd().follow(words(a))
end, { nargs = '?', complete = complete_sessions, desc = "cloudd: follow a session's log" })

vim.api.nvim_create_user_command('CloudSend', function(a)
  cloudd().send(a.args)
end, { nargs = '+', complete = complete_sessions, desc = 'cloudd: send a message' })

vim.api.nvim_create_user_command('CloudAllow', function(a)
  cloudd().allow(words(a))
end, { nargs = '?', desc = 'cloudd: allow the pending permission prompt' })

vim.api.nvim_create_user_command('CloudDeny', function(a)
  cloudd().deny(a.args)
end, { nargs = '*', desc = 'cloudd: deny the pending permission prompt' })

vim.api.nvim_create_user_command('CloudInterrupt', function(a)
  cloudd().interrupt(words(a))
end, { nargs = '?', complete = complete_sessions, desc = "cloudd: interrupt a session's agent" })

vim.api.nvim_create_user_command('CloudTeleport', function(a)
  cloudd().teleport(words(a))
end, {
  nargs = '+',
  complete = function(lead, line)
    if line:match('^%S+%s+%S*$') then
      return vim.tbl_filter(function(verb)
        return verb:sub(1, #lead) == lead
      end, { 'push', 'pull', 'watch', 'stop', 'status' })
    end
    return vim.fn.getcompletion(lead, 'dir')
  end,
  desc = 'cloudd: teleport a folder to or from the followed session',
})
