-- Every reconciliation run (on demand or by the scheduler), with its report.
CREATE TABLE reconciliation_runs (
    id        BIGSERIAL   PRIMARY KEY,
    ran_at    TIMESTAMPTZ NOT NULL,
    ran_by    TEXT        NOT NULL,
    balanced  BOOLEAN     NOT NULL,
    findings  BIGINT      NOT NULL,
    report    JSONB       NOT NULL
);
CREATE INDEX reconciliation_runs_ran_at ON reconciliation_runs (ran_at DESC);
