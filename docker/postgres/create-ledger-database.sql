-- trialpipe's audit ledger lives in its own database beside Airflow's, owned by the same
-- role; trialpipe creates its append-only tables and triggers on first use. The postgres
-- image runs this once, when it initialises an empty data volume.
CREATE DATABASE trialpipe_ledger OWNER airflow;
