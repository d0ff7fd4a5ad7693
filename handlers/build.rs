// `sqlx::migrate!` embeds ../migrations at compile time: rebuild when a migration
// is added or edited, or the binary would carry yesterday's schema.
fn main() {
    println!("cargo:rerun-if-changed=../migrations");
}
