-- A conversion leg's recorded rate (events::wallet::FxRate) in the history read model.
ALTER TABLE proj_wallet_entries ADD COLUMN fx jsonb;
