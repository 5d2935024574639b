"""Release archives and other files the daemon deploys to agents."""
