"""Print a compose .env with fresh random credentials: python deploy/compose/make_env.py > deploy/compose/.env"""

import secrets

for name in ("DISTSERVE_API_KEY", "NATS_PASSWORD", "REDIS_PASSWORD"):
    print(f"{name}={secrets.token_urlsafe(24)}")
