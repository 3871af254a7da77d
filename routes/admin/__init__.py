"""Blueprints of /api/admin."""
