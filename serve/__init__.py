"""Ray Serve application: OpenAI-compatible HTTP ingress, batched ASR and diarization replicas.

Importing the package is cheap; `serve.app` binds the graph (and imports Ray Serve).
"""
