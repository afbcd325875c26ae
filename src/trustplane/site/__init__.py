"""What a browser gets outside the protocol: the index at ``/`` and the API docs (Swagger UI served
from the package, so ``/docs`` works offline)."""
