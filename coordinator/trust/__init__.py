"""Trust: tokens, agent identities, the coordinator's PKI and the auth interceptor."""
