//! `sqlx::migrate!` embeds the migration files at compile time; without this, cargo
//! does not know to rebuild the crate when a migration is added (sqlx's documented fix).
fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
