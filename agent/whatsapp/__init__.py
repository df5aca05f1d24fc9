"""WhatsApp backends behind one interface (:mod:`agent.whatsapp.base`)."""
