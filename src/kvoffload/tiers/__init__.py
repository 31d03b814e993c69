"""Storage tiers: the host pool (hot) and the persistent tiers behind it (disk, Redis/Valkey)."""
