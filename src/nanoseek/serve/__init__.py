"""Serving: a DeepSeek/OpenAI-compatible HTTP API over the inference engine, and a web chat.

`nanoseek.serve.app.create_app(engine)` builds the FastAPI app; `nanoseek serve --model DIR`
runs it on uvicorn. FastAPI and uvicorn come with the `serve` extra (`pip install
nanoseek[serve]`), so this package imports neither until they are needed.
"""
