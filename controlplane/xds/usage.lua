-- Reads the `usage` block of a JSON body, or of the last SSE chunk, as the body
-- streams past (bodyChunks() does not buffer), into dynamic metadata for the
-- access log. Streams without usage get a count of content chunks instead.
local function scan(text, found)
  for v in string.gmatch(text, '"prompt_tokens"%s*:%s*(%d+)') do found.prompt = v end
  for v in string.gmatch(text, '"completion_tokens"%s*:%s*(%d+)') do found.completion = v end
end

function envoy_on_response(handle)
  local ctype = handle:headers():get("content-type") or ""
  local stream = string.find(ctype, "text/event-stream", 1, true) ~= nil
  if not stream and string.find(ctype, "json", 1, true) == nil then return end
  local found, tail, chunks = {}, "", 0
  for chunk in handle:bodyChunks() do
    local bytes = chunk:getBytes(0, chunk:length())
    local text = tail .. bytes
    scan(text, found)
    if stream then
      local _, n = string.gsub(bytes, '"content"%s*:%s*"[^"]', "")
      chunks = chunks + n
    end
    tail = string.sub(text, -256)
  end
  local meta = handle:streamInfo():dynamicMetadata()
  if found.prompt then meta:set("llm_lb.usage", "prompt_tokens", tonumber(found.prompt)) end
  if found.completion then meta:set("llm_lb.usage", "completion_tokens", tonumber(found.completion)) end
  if stream then meta:set("llm_lb.usage", "content_chunks", chunks) end
end
