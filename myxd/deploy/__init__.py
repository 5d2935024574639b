"""Deployments: artifacts pushed to agents, playbook runs across the fleet, drift."""
