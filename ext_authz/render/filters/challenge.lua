function envoy_on_request(handle)
  -- The origin the caller addressed, as the sidecar's request_origin says it.
  local headers = handle:headers()
  local authority = headers:get(":authority") or ""
  local scheme = (headers:get("x-forwarded-proto") or ""):match("^%s*([^,]-)%s*$") or ""
  if scheme == "" then scheme = headers:get(":scheme") or "http" end
  scheme = scheme:lower()
  if (scheme == "http" or scheme == "https") and #authority <= 255
      and authority:match("^[%w%.%-_~:%[%]]+$") then
    handle:streamInfo():dynamicMetadata():set("mcp_ext_authz.challenge", "origin",
                                              scheme .. "://" .. authority)
  end
end

-- Without a URL to name, the parameter goes with the comma that joined it to the others.
local function without_metadata(value)
  value = value:gsub('%s*,%s*resource_metadata="[^"]*"', "")
  value = value:gsub('resource_metadata="[^"]*"%s*,?%s*', "")
  return (value:gsub("%s+$", ""))
end

function envoy_on_response(handle)
  local headers = handle:headers()
  local count = headers:getNumValues("www-authenticate")
  if count == 0 then return end
  local mine = handle:streamInfo():dynamicMetadata():get("mcp_ext_authz.challenge")
  local path = handle:metadata():get("metadata_path")
  local replacement = ""
  if mine ~= nil and mine["origin"] ~= nil and path ~= nil then
    local url = mine["origin"] .. path
    replacement = 'resource_metadata="' .. url:gsub("%%", "%%%%") .. '"'
  end
  local challenges = {}
  for i = 0, count - 1 do
    local value = headers:getAtIndex("www-authenticate", i)
    if replacement == "" then
      challenges[#challenges + 1] = without_metadata(value)
    else
      challenges[#challenges + 1] = (value:gsub('resource_metadata="[^"]*"', replacement))
    end
  end
  headers:remove("www-authenticate")
  for _, value in ipairs(challenges) do
    headers:add("www-authenticate", value)
  end
end
