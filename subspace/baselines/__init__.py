"""Peer tools this project is compared with, each run as a separate program (never imported)."""
