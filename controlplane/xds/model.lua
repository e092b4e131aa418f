-- Upstream filter, per attempt: rewrites the request body's "model" from the name the
-- app sent (x-llm-model, copied from the body by the listener) to the chosen backend's
-- own model name, which the header_mutation filter before this one put in x-llm-lb-model
-- from the endpoint's metadata. Only pools with a backend that has its own name run it.
local function literal(s)
  return (string.gsub(s, "[%^%$%(%)%%%.%[%]%*%+%-%?]", "%%%0"))
end

function envoy_on_request(handle)
  local headers = handle:headers()
  local target = headers:get("x-llm-lb-model")
  if target == nil then return end
  headers:remove("x-llm-lb-model")
  local requested = headers:get("x-llm-model")
  if target == "" or requested == nil or requested == target then return end
  local body = handle:body()
  if body == nil then return end
  local text = body:getBytes(0, body:length())
  local out, n = string.gsub(text, '("model"%s*:%s*")' .. literal(requested) .. '"', "%1" .. target .. '"', 1)
  if n == 1 then
    body:setBytes(out)
    headers:replace("content-length", tostring(#out))
  end
end
