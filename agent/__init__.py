"""The wabridge worker: one WhatsApp account, one Claude Code process per chat."""
