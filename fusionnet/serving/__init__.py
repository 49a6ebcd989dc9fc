"""Serving: the HTTP server (FastAPI) and Ray Serve replicas."""
