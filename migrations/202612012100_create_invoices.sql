-- Invoices (applied by projector `wallet`, so an invoice payment's ledger legs
-- and its invoice row reach the same checkpoint). proj_invoices is also the
-- scheduler's due work for overdue marking, proj_invoice_schedules for runs.

CREATE TABLE proj_invoices (
    invoice_id   UUID PRIMARY KEY,
    issuer       UUID        NOT NULL,
    client_user  UUID,
    client_email TEXT,
    client_name  TEXT,
    currency     TEXT        NOT NULL,
    lines        JSONB       NOT NULL,
    total        BIGINT      NOT NULL CHECK (total > 0),
    amount_paid  BIGINT      NOT NULL DEFAULT 0 CHECK (amount_paid >= 0 AND amount_paid <= total),
    due_at       TIMESTAMPTZ NOT NULL,
    memo         TEXT,
    status       TEXT        NOT NULL CHECK (status IN ('draft', 'sent', 'overdue', 'paid', 'void')),
    number       TEXT,                         -- INV-YYYY-NNNNN once sent
    year         INT,
    seq          BIGINT,
    schedule_id  UUID,
    created_at   TIMESTAMPTZ NOT NULL,
    sent_at      TIMESTAMPTZ,
    paid_at      TIMESTAMPTZ,
    overdue_at   TIMESTAMPTZ,
    voided_at    TIMESTAMPTZ,
    void_reason  TEXT,
    version      BIGINT      NOT NULL,
    position     BIGINT      NOT NULL
);
-- One number per issuer and year: a second row with the same one is a bug the projector refuses loudly.
CREATE UNIQUE INDEX proj_invoices_number ON proj_invoices (issuer, year, seq) WHERE seq IS NOT NULL;
CREATE INDEX proj_invoices_issuer ON proj_invoices (issuer, created_at, invoice_id);
CREATE INDEX proj_invoices_client ON proj_invoices (client_user, created_at, invoice_id) WHERE client_user IS NOT NULL;
CREATE INDEX proj_invoices_due ON proj_invoices (due_at) WHERE status = 'sent';

CREATE TABLE proj_invoice_payments (
    payment_id  UUID PRIMARY KEY,           -- = the ledger transfer id
    invoice_id  UUID        NOT NULL,
    payer       UUID        NOT NULL,
    amount      BIGINT      NOT NULL,
    via_link    BOOLEAN     NOT NULL,
    paid_at     TIMESTAMPTZ NOT NULL,
    position    BIGINT      NOT NULL
);
CREATE INDEX proj_invoice_payments_invoice ON proj_invoice_payments (invoice_id, position);

CREATE TABLE proj_invoice_schedules (
    schedule_id  UUID PRIMARY KEY,
    issuer       UUID        NOT NULL,
    template     JSONB       NOT NULL,
    every        TEXT        NOT NULL,      -- weekly, monthly
    zone         TEXT        NOT NULL,
    next_run_at  TIMESTAMPTZ,                -- null: cancelled
    status       TEXT        NOT NULL CHECK (status IN ('active', 'cancelled')),
    runs         INT         NOT NULL DEFAULT 0,
    last_invoice UUID,
    created_at   TIMESTAMPTZ NOT NULL,
    version      BIGINT      NOT NULL,
    position     BIGINT      NOT NULL
);
CREATE INDEX proj_invoice_schedules_issuer ON proj_invoice_schedules (issuer, created_at, schedule_id);
CREATE INDEX proj_invoice_schedules_due ON proj_invoice_schedules (next_run_at) WHERE status = 'active';
