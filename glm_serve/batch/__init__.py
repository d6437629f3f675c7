"""Offline batch generation: the files and batches API (routes.py) with its crash-safe store (store.py) and
in-server worker (worker.py), and `glm-serve batch` (cli.py); runner.py turns one line into its answer the way
the chat endpoint does. Imports are lazy: glm_serve.api.app mounts the routes from inside create_app."""
