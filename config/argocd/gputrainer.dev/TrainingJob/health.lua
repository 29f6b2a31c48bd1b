-- Argo CD health check for gputrainer.dev/TrainingJob (gpu-trainer).
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
if status == nil or status.phase == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the gpu-trainer operator to pick up the job"
  return hs
end
local phase = status.phase

-- Final phases first: the operator does not write the status of a finished job again, so its
-- observedGeneration stays behind when the spec is edited afterwards.
if phase == "Succeeded" then
  hs.status = "Healthy"
  hs.message = describe(nil, status.message, "Succeeded")
  return hs
end
if phase == "Failed" then
  hs.status = "Degraded"
  hs.message = describe(status.reason, status.message, "Failed")
  return hs
end

local generation = nil
if obj.metadata ~= nil then
  generation = obj.metadata.generation
end
if generation ~= nil and status.observedGeneration ~= nil and status.observedGeneration < generation then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to observe generation " .. generation
    .. " (status is of generation " .. status.observedGeneration .. ")"
  return hs
end

if phase == "Suspended" then
  hs.status = "Suspended"
  hs.message = describe(nil, status.message, "Suspended")
  return hs
end

-- A stall stops the job once its grace period is over unless training recovers.
if isTrue(status, "Stalled") then
  hs.status = "Degraded"
  hs.message = describe("Stalled", condition(status, "Stalled").message, "Stalled")
  return hs
end

if phase == "Pending" or phase == "Provisioning" or phase == "Staging" or phase == "Training"
  or phase == "Uploading" then
  local text = phase
  local progress = status.progress
  if phase == "Training" and progress ~= nil and progress.step ~= nil then
    text = text .. " step " .. progress.step
    if progress.totalSteps ~= nil then
      text = text .. "/" .. progress.totalSteps
    end
    if present(progress.percentText) then
      text = text .. " (" .. progress.percentText .. ")"
    end
  end
  if present(status.message) then
    text = text .. ": " .. status.message
  end
  if isTrue(status, "SoftDeadlineExceeded") then
    text = text .. "; " .. describe(nil, condition(status, "SoftDeadlineExceeded").message, "soft deadline passed")
  end
  hs.status = "Progressing"
  hs.message = text
  return hs
end

hs.status = "Unknown"
hs.message = "Unknown phase " .. tostring(phase)
return hs
