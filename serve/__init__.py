"""The online retriever (Ray Serve): ``serve/app.py`` builds it, ``serve/config.yaml`` deploys it.

Importing this package imports nothing heavy; ``serve.app`` imports Ray Serve and the library.
"""
