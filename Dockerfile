# Konstruct worker image (used by deploy/compose). Provider keys come from the
# container's environment at run time, never from the image.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY konstruct konstruct
COPY workflows workflows
COPY activities activities
COPY workers workers
COPY deploy deploy
# The demo's RAG step indexes docs/demo-docs.
COPY docs docs
RUN pip install --no-cache-dir .
ENV KONSTRUCT_ROUTER_CONFIG=/app/deploy/llm-router.yaml
CMD ["konstruct", "worker"]
