-- Orthanc auto-routing of CT series to ctp-node (loaded through "LuaScripts" in orthanc.json).
--
-- When a series has been stable for StableAge seconds (no new instance), Orthanc calls
-- OnStableSeries. Every CT series goes to the node, which decides itself whether it is a CT
-- perfusion series (anything else ends as "ignored" in `ctp-node jobs list`): scanners name their
-- perfusion protocols too differently for a description filter here to be safe.
--
-- Never routed: the node's own output, which comes back to this PACS. Routing it again would loop
-- (a synthetic series sent for inpainting, its result sent again, ...). It is recognised twice over:
-- SeriesDescription containing "SYNTHETIC" (ctp-node refuses a description without it) and
-- Manufacturer "ctp-node" (written into every derived instance).
--
-- Sending uses the REST route /modalities/{name}/store for the whole series: one C-STORE
-- association and one Orthanc job per series, visible and resubmittable under /jobs. The Lua
-- SendToModality() takes one instance ID per call (its argument becomes a single-instance input
-- of a Lua job), so it suits OnStoredInstance, not a whole series.
--
-- Plain Lua 5.1 to 5.4 (Orthanc embeds one of these); tests/deploy runs the functions below
-- under lua5.4 with stubs for Orthanc's RestApiPost and DumpJson.

-- The DicomModalities entry of the node in orthanc.json (AET CTPNODE, host ctp-node, port 11112).
CTP_NODE_MODALITY = 'ctpnode'

local function trim(value)
  return (string.gsub(value or '', '^%s*(.-)%s*$', '%1'))
end

-- Whether a stable series, given by its main DICOM tags as Orthanc passes them, is to be sent:
-- true, or false and the reason (logged, so that "why was my series not processed" has an answer).
function CtpNodeShouldRoute(tags)
  if type(tags) ~= 'table' then
    return false, 'no tags'
  end
  if string.upper(trim(tags['Modality'])) ~= 'CT' then
    return false, 'modality ' .. trim(tags['Modality']) .. ' is not CT'
  end
  if string.find(string.upper(tags['SeriesDescription'] or ''), 'SYNTHETIC', 1, true) then
    return false, 'SeriesDescription says SYNTHETIC (ctp-node output)'
  end
  if string.lower(trim(tags['Manufacturer'])) == 'ctp-node' then
    return false, 'Manufacturer is ctp-node (ctp-node output)'
  end
  return true
end

function OnStableSeries(seriesId, tags, metadata)
  local route, reason = CtpNodeShouldRoute(tags)
  if not route then
    print('ctp-node routing: series ' .. seriesId .. ' not routed: ' .. reason)
    return
  end
  local request = {}
  request['Resources'] = { seriesId }
  request['Asynchronous'] = true  -- do not block Orthanc's Lua event thread for the transfer
  local answer = RestApiPost('/modalities/' .. CTP_NODE_MODALITY .. '/store', DumpJson(request, true))
  if answer == nil then
    print('ctp-node routing: could not submit series ' .. seriesId .. ' to ' .. CTP_NODE_MODALITY)
  else
    print('ctp-node routing: series ' .. seriesId .. ' (' .. (tags['SeriesDescription'] or '') ..
          ') submitted to ' .. CTP_NODE_MODALITY)
  end
end
