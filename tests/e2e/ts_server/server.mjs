// A TypeScript MCP server as the official SDK documents it: express.json() parses the body
// (in whatever charset Content-Type names), then transport.handleRequest(req, res, req.body).
// Stateless: a fresh server and transport per request. Prints one JSON line per request
// (method, path, headers; Authorization cut to 20 characters): what the upstream received.
import { McpServer, ResourceTemplate } from "@modelcontextprotocol/sdk/server/mcp.js";
import { StreamableHTTPServerTransport } from "@modelcontextprotocol/sdk/server/streamableHttp.js";
import express from "express";
import { z } from "zod";

const args = Object.fromEntries(
  process.argv.slice(2).reduce((pairs, arg, i, all) =>
    arg.startsWith("--") ? [...pairs, [arg.slice(2), all[i + 1]]] : pairs, []));
const name = args.name ?? "ts";
const port = Number(args.port ?? 0);
// --without a,b: leave these tools out (the server a caller should see, to compare with).
const without = new Set((args.without ?? "").split(",").filter(Boolean));

function buildServer(req) {
  const server = new McpServer({ name, version: "1.0.0" });
  const registerTool = server.registerTool.bind(server);
  server.registerTool = (tool, ...rest) => (without.has(tool) ? undefined : registerTool(tool, ...rest));
  server.registerTool("whoami", { description: "What this server received" }, async () => {
    const authorization = req.headers.authorization ?? null;
    const result = { server: name, authorization };
    return { content: [{ type: "text", text: JSON.stringify(result) }], structuredContent: result };
  });
  server.registerTool("add", {
    description: "Add two numbers",
    inputSchema: { a: z.number(), b: z.number() },
  }, async ({ a, b }) => {
    const result = { result: a + b };
    return { content: [{ type: "text", text: String(a + b) }], structuredContent: result };
  });
  server.registerTool("delete_repo", { description: "Deletes a repository (for tests)" },
    async () => ({ content: [{ type: "text", text: "deleted" }] }));
  // Prompts and resources, one of each fit to hide (as the Python demo server has them).
  server.registerPrompt("summarize", { description: "Summarize a text.",
    argsSchema: { text: z.string() } }, ({ text }) => ({
    messages: [{ role: "user", content: { type: "text", text: `Summarize this: ${text}` } }] }));
  server.registerPrompt("delete_help", {
    description: "How to delete a repository (an internal runbook)." }, () => ({
    messages: [{ role: "user", content: { type: "text",
      text: "Call delete_repo with the repository's name; it cannot be undone." } }] }));
  server.registerResource("readme", "repo://docs/readme", { description: "The public readme." },
    async (uri) => ({ contents: [{ uri: uri.href, text: "Welcome." }] }));
  server.registerResource("victim", "repo://victim/delete", {
    description: "Reading it deletes the victim repository." }, async (uri) => {
    console.log(JSON.stringify({ upstream: name, side_effect: uri.href }));
    return { contents: [{ uri: uri.href, text: "deleted" }] };
  });
  server.registerResource("secrets", new ResourceTemplate("repo://{owner}/secrets",
    { list: undefined }), { description: "An owner's secrets." },
    async (uri, { owner }) => ({ contents: [{ uri: uri.href, text: `the secrets of ${owner}` }] }));
  return server;
}

const app = express();
app.use((req, _res, next) => {
  const headers = {};
  for (let i = 0; i < req.rawHeaders.length; i += 2) {
    const key = req.rawHeaders[i].toLowerCase();
    let value = req.rawHeaders[i + 1];
    if (key === "authorization") value = value.slice(0, 20);
    (headers[key] ??= []).push(value);
  }
  console.log(JSON.stringify({ upstream: name, method: req.method, raw_path: req.url, headers }));
  next();
});
app.use(express.json());
app.all(`/mcp/${name}`, async (req, res) => {
  if (req.method !== "POST") {
    res.status(405).set("Allow", "POST").json({
      jsonrpc: "2.0", error: { code: -32000, message: "Method not allowed." }, id: null });
    return;
  }
  const server = buildServer(req);
  const transport = new StreamableHTTPServerTransport({ sessionIdGenerator: undefined });
  res.on("close", () => { transport.close(); server.close(); });
  await server.connect(transport);
  await transport.handleRequest(req, res, req.body);
});
app.get(`/mcp/${name}/echo`, (_req, res) => res.json({ ok: true }));

const listener = app.listen(port, "127.0.0.1", () => {
  console.log(JSON.stringify({ listening: listener.address().port }));
});
