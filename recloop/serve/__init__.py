"""Real-time serving: inference engines, item indexes, user state/cache, the HTTP service."""
