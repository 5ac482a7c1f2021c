"""Serving and interactive use of Firebolt-VL.

    engine.py    one thread owns the model and runs queued requests in small left-padded batches (streamed tokens)
    schema.py    the OpenAI chat-completions request (Pydantic) and the OpenAI error shape
    images.py    image parts -> bytes: data: URLs, local files under an allowed folder, optional remote URLs
    app.py       the FastAPI app: POST /v1/chat/completions, GET /v1/models, GET /health; `start_server` for tests
    chat.py      `firebolt-vl chat`: a streamed multi-turn terminal chat
    explain.py   `firebolt-vl explain`: the CMM's token-to-grid weights as heat over the image views
    cli.py       the command functions (`serve`, `chat`, `explain`) and their argparse arguments
    loadtest.py  `python -m firebolt_vl.serve.loadtest`: requests/s for N concurrent clients

Nothing heavy is imported here: the CLI imports these modules only when a command runs.
"""
