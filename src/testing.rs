//! Test support shared by the unit tests that need a real database.

/// A database of its own for one test, dropped by [`FreshDatabase::drop_it`].
pub(crate) struct FreshDatabase {
    admin: String,
    name: String,
}

impl FreshDatabase {
    /// A new name under the test server (`LEASEHOLD_TEST_DATABASE_URL`,
    /// else the local default). Nothing is created: a node, or the test
    /// through the store, creates the database on first use.
    pub(crate) fn new() -> Self {
        let admin = std::env::var("LEASEHOLD_TEST_DATABASE_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".to_owned());
        let name = format!("leasehold_test_{}", uuid::Uuid::new_v4().simple());
        Self { admin, name }
    }

    /// Its URL.
    pub(crate) fn url(&self) -> String {
        format!("{}/{}", self.admin, self.name)
    }

    /// Drops it.
    pub(crate) async fn drop_it(self) {
        let (client, connection) =
            tokio_postgres::connect(&format!("{}/postgres", self.admin), tokio_postgres::NoTls)
                .await
                .unwrap();
        tokio::spawn(connection);
        client
            .batch_execute(&format!(
                "DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)",
                self.name
            ))
            .await
            .unwrap();
    }
}
