"""msgledger: the durable record of every outbound Twilio message."""
