//! Attack 3: only VerneMQ, with its client certificate, reaches the webhooks over HTTPS.
