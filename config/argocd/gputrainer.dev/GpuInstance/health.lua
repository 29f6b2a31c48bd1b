-- Argo CD health check for gputrainer.dev/GpuInstance (gpu-trainer).
-- Only Lua's base library is used: Argo CD runs argocd-cm scripts without the string and math
-- libraries unless useOpenLibs is set.
local hs = {}

local function condition(status, kind)
  if status.conditions == nil then
    return nil
  end
  for _, c in ipairs(status.conditions) do
    if c.type == kind then
      return c
    end
  end
  return nil
end

local function isTrue(status, kind)
  local c = condition(status, kind)
  return c ~= nil and c.status == "True"
end

local function present(text)
  return text ~= nil and text ~= ""
end

-- "Reason: message", or whichever of the two is set, or the fallback.
local function describe(reason, message, fallback)
  if present(reason) and present(message) then
    return reason .. ": " .. message
  end
  if present(message) then
    return message
  end
  if present(reason) then
    return reason
  end
  return fallback
end

local status = obj.status
local metadata = obj.metadata
if metadata == nil then
  metadata = {}
end

-- A machine that will not go away keeps billing: this wins over everything else.
if status ~= nil and isTrue(status, "TerminationStuck") then
  hs.status = "Degraded"
  hs.message = describe("TerminationStuck", condition(status, "TerminationStuck").message, "TerminationStuck")
  return hs
end

if status == nil or status.phase == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the gpu-trainer operator to rent a machine"
  return hs
end
local phase = status.phase

if phase == "Terminated" then
  hs.status = "Healthy"
  hs.message = describe(status.reason, status.message, "Terminated")
  return hs
end
if phase == "Terminating" then
  hs.status = "Progressing"
  hs.message = describe(status.reason, status.message, "Terminating")
  return hs
end
if metadata.deletionTimestamp ~= nil then
  hs.status = "Progressing"
  hs.message = "Being deleted: waiting for the operator to release the machine"
  return hs
end
if phase == "Failed" or phase == "Lost" then
  hs.status = "Degraded"
  hs.message = describe(status.reason, status.message, phase)
  return hs
end

if metadata.generation ~= nil and status.observedGeneration ~= nil
  and status.observedGeneration < metadata.generation then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to observe generation " .. metadata.generation
    .. " (status is of generation " .. status.observedGeneration .. ")"
  return hs
end

if phase == "Running" and isTrue(status, "Ready") then
  hs.status = "Healthy"
  hs.message = describe(status.reason, status.message, "Ready")
  return hs
end

if phase == "Pending" or phase == "Creating" or phase == "Booting" or phase == "Running" then
  hs.status = "Progressing"
  hs.message = describe(status.reason, status.message, phase)
  return hs
end

hs.status = "Unknown"
hs.message = "Unknown phase " .. tostring(phase)
return hs
