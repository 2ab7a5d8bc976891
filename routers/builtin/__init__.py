"""Built-in routers, one per file; each module registers its router on import."""
