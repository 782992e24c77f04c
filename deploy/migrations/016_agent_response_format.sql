-- Structured answers (issue 23): an agent may require its final answer to be JSON
-- in a format (OpenAI's `response_format`: json_object, or json_schema with the
-- schema); a request's own `response_format` takes its place for that message.
alter table agents add column response_format jsonb;
