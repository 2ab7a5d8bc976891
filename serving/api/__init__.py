"""The HTTP API: FastAPI routes (``routes``), OpenAI pydantic models (``models``), the ingress
logic (``service``, ``admin``), error → HTTP mapping (``errors``). Imported lazily by the app."""
