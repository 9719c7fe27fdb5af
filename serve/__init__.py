"""Serving memlab models with Ray Serve: stateful sessions over one model from the MLflow registry.

`serve.app` (the application and its typed arguments), `serve.local` (run it on this machine),
`serve.client` (a typed HTTP client). The HTTP schema is in `serve.schema`.
"""
