# mcp-ext-authz: the sidecar (and, for docker-compose.yaml, the demo MCP servers and token
# endpoint, which run from the same image with other commands).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY ext_authz ./ext_authz
RUN pip install '.[fast,mcp]' \
 && useradd --system --uid 10001 --no-create-home mcp-ext-authz

USER 10001
EXPOSE 9191 9192
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9192/readyz', timeout=2)"]
ENTRYPOINT ["mcp-ext-authz"]
CMD ["serve", "--config", "/etc/mcp-ext-authz/config.yaml"]
