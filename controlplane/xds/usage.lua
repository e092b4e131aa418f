-- Reads the `usage` block of the last SSE chunk of a streamed response as the
-- body streams past (bodyChunks() does not buffer), into dynamic metadata for
-- the access log; streams without usage get a count of content chunks instead.
-- JSON responses are read by json_to_metadata, natively: this returns at once.
local function scan(text, found)
  for v in string.gmatch(text, '"prompt_tokens"%s*:%s*(%d+)') do found.prompt = v end
  for v in string.gmatch(text, '"completion_tokens"%s*:%s*(%d+)') do found.completion = v end
end

function envoy_on_response(handle)
  local ctype = handle:headers():get("content-type") or ""
  if string.find(ctype, "text/event-stream", 1, true) == nil then return end
  local found, tail, chunks = {}, "", 0
  for chunk in handle:bodyChunks() do
    local bytes = chunk:getBytes(0, chunk:length())
    local text = tail .. bytes
    scan(text, found)
    local _, n = string.gsub(bytes, '"content"%s*:%s*"[^"]', "")
    chunks = chunks + n
    tail = string.sub(text, -256)
  end
  local meta = handle:streamInfo():dynamicMetadata()
  if found.prompt then meta:set("llm_lb.usage", "prompt_tokens", tonumber(found.prompt)) end
  if found.completion then meta:set("llm_lb.usage", "completion_tokens", tonumber(found.completion)) end
  meta:set("llm_lb.usage", "content_chunks", chunks)
end
