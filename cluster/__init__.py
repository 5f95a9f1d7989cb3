"""Connecting to Ray, worker resources and placement, and cluster templates."""
