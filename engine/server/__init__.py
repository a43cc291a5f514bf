"""fastllava.server: the HTTP server behind `fastllava serve` (install the `server` extra).

fal's queue and run protocol, OpenAI chat completions, /health and /metrics over one loaded
model, with a durable job queue (SQLite by default, Redis when several processes share one
endpoint). Entry point: `fastllava.server.app.create_app(settings, llava)`.
"""
