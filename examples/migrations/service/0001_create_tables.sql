-- The service's tables. One statement per transaction (the migration runner runs each alone),
-- UUID keys made by the client, relations without foreign keys.
CREATE TABLE owner (
    id uuid PRIMARY KEY,
    name text NOT NULL,
    city text NOT NULL,
    telephone text,
    visits bigint NOT NULL DEFAULT 0
);
CREATE TABLE pet (
    id uuid PRIMARY KEY,
    name text NOT NULL,
    birth_date date NOT NULL,
    owner_id uuid NOT NULL
);
CREATE TABLE vet (id uuid PRIMARY KEY, name text NOT NULL UNIQUE);
CREATE TABLE specialty (id uuid PRIMARY KEY, name text NOT NULL UNIQUE);
CREATE TABLE vet_specialty (id uuid PRIMARY KEY, vet_id uuid NOT NULL, specialty_id uuid NOT NULL);
