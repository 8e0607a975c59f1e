"""star_server: the star language server (LSP over stdio): completions from the local model, and
"mark as wrong / provide fix" -> a STAR repair of that model. See docs/server.md and docs/protocol.md."""
