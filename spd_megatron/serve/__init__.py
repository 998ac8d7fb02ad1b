"""Serving: an OpenAI-compatible HTTP endpoint over the pipeline ranks (``python -m spd_megatron.serve``).

server.py starts every rank; app.py (FastAPI, rank 0) checks requests and streams answers;
worker.py runs rank 0's decode thread and its FIFO; wire.py is what rank 0 tells the other ranks;
protocol.py and output.py are the OpenAI bodies; prom.py the /metrics text.
"""
